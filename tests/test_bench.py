"""collie bench: grid files load and validate, summaries skip warm-up, and a 2-configuration grid runs."""
import csv
import glob
import json
import math
import os
import sys

import pytest

from collie.bench import load_grid, run_one, summarise
from collie.bench.cli import bench_main
from collie.cli import main
from collie.distributed.launch import DistributedRunError
from collie.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = sorted(glob.glob(os.path.join(ROOT, "configs", "bench", "*.yaml")))
LAYOUTS = os.path.join(ROOT, "configs", "bench", "layouts_tiny.yaml")


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("path", GRIDS, ids=os.path.basename)
def test_every_shipped_grid_loads_and_validates_each_configuration(path):
    grid = load_grid(path)
    assert grid.runs and grid.steps >= 1
    for run in grid.runs:
        assert run.config.train.max_steps == grid.warmup_steps + grid.steps
        assert os.path.isfile(run.base)


def test_axes_make_a_product_and_configs_add_to_it(tmp_path):
    grid = load_grid(write(tmp_path / "g.yaml", f"""
base: {os.path.join(ROOT, "configs", "quickstart.yaml")}
overrides: [optim.lr=1e-3]
axes:
  - [{{name: dp1, nproc: 1}}, {{name: dp2, nproc: 2, overrides: [parallel.dp=2]}}]
  - [{{name: adamw}}, {{name: lion, overrides: [optim.name=lion]}}]
configs:
  - {{name: lora, overrides: [peft.method=lora]}}
"""), ["train.seed=3"])
    assert [(r.name, r.nproc) for r in grid.runs] == [("dp1/adamw", 1), ("dp1/lion", 1), ("dp2/adamw", 2),
                                                      ("dp2/lion", 2), ("lora", 1)]
    assert grid.runs[3].overrides == ["optim.lr=1e-3", "parallel.dp=2", "optim.name=lion", "train.seed=3"]
    assert grid.runs[3].config.optim.name == "lion" and grid.runs[3].layout() == "dp2 tp1 pp1 zero0"
    assert grid.runs[3].slug == "dp2_lion"


@pytest.mark.parametrize("text, message", [
    ("base: ../quickstart.yaml\nconfigs: [{name: a}]\nstep: 3", "unknown key 'step' (did you mean 'steps'?)"),
    ("configs: [{name: a}]", "'base' is missing"),
    ("base: nowhere.yaml\nconfigs: [{name: a}]", "base 'nowhere.yaml' not found"),
    ("base: ../quickstart.yaml", "the grid is empty"),
    ("base: ../quickstart.yaml\nconfigs: [{name: a, overrides: [optim.lr=-1]}]",
     "configuration 'a': optim.lr=-1.0 is out of range"),
    ("base: ../quickstart.yaml\nconfigs: [{name: a, nproc: 2, overrides: [parallel.tp=4]}]",
     "configuration 'a' runs on nproc=2 ranks but asks for dp=-1 × tp=4 × pp=1"),
    ("base: ../quickstart.yaml\nconfigs: [{name: a}, {name: a}]", "'a' appears twice"),
    ("base: ../quickstart.yaml\nconfigs: [{name: a, overrides: [eval.metrics=[x]]}]", "is not valid YAML"),
])
def test_a_bad_grid_names_the_file_and_the_problem(tmp_path, text, message):
    os.makedirs(tmp_path / "configs" / "bench")
    (tmp_path / "configs" / "quickstart.yaml").write_text(open(os.path.join(ROOT, "configs", "quickstart.yaml")).read())
    path = write(tmp_path / "configs" / "bench" / "bad.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    assert path in str(error.value) and message in str(error.value)


def test_only_names_configurations_of_the_grid():
    assert [r.name for r in load_grid(LAYOUTS, only=["tp2", "dp1"]).runs] == ["dp1", "tp2"]
    with pytest.raises(ConfigError, match="no configuration named 'dp3'; the grid has: dp1, dp2"):
        load_grid(LAYOUTS, only=["dp3"])


FUSED = os.path.join(ROOT, "configs", "bench", "fused_tiny.yaml")


def test_baselines_mirror_the_configuration_they_are_the_reference_of():
    grid = load_grid(FUSED)
    assert [(b.name, b.kind, b.against, b.mirror.name) for b in grid.baselines] == [
        ("hf-adamw", "hf_adamw", ["adamw"], "adamw"),
        ("lomo-optim-lomo", "lomo_optim_lomo", ["lomo", "lomo-two-pass"], "lomo"),
        ("lomo-optim-adalomo", "lomo_optim_adalomo", ["adalomo", "adalomo-two-pass"], "adalomo")]
    only = load_grid(FUSED, only=["adamw", "lomo-two-pass"]).baselines  # --only keeps the baselines it needs
    assert [(b.name, b.against, b.mirror.name) for b in only] == [("hf-adamw", ["adamw"], "adamw"),
                                                                  ("lomo-optim-lomo", ["lomo-two-pass"], "lomo-two-pass")]


@pytest.mark.parametrize("baseline, message", [
    ("{name: b, kind: hf_sgd, against: [a]}", "kind 'hf_sgd' is unknown; choose from hf_adamw, lomo_optim_lomo"),
    ("{name: b, kind: hf_adamw, against: [z]}", "'against' must name configurations of the grid (a, lora, accum); got ['z']"),
    ("{name: a, kind: hf_adamw, against: [a]}", "a baseline needs a name of its own"),
    ("{name: b, kind: hf_adamw, against: [lora]}", "runs one process without PEFT"),
    ("{name: b, kind: lomo_optim_lomo, against: [accum]}", "lomo-optim has no gradient accumulation"),
])
def test_a_bad_baseline_names_the_problem(tmp_path, baseline, message):
    path = write(tmp_path / "g.yaml", f"""
base: {os.path.join(ROOT, "configs", "quickstart.yaml")}
configs: [{{name: a}}, {{name: lora, overrides: [peft.method=lora]}}, {{name: accum, overrides: [train.grad_accum_steps=2]}}]
baselines: [{baseline}]
""")
    with pytest.raises(ConfigError) as error:
        load_grid(path)
    assert f"{path}: baseline" in str(error.value) and message in str(error.value)


def test_ratios_divide_collie_by_its_baseline():
    from collie.bench.report import ratios, render_markdown
    rows = [{"name": "adamw", "status": "ok", "tokens_per_s_per_gpu": 300.0, "peak_mem_gib": 1.0},
            {"name": "hf", "status": "ok", "tokens_per_s_per_gpu": 200.0, "peak_mem_gib": 2.0},
            {"name": "adalomo", "status": "ok", "tokens_per_s_per_gpu": 100.0, "peak_mem_gib": 1.0},
            {"name": "ref", "status": "skipped: needs CUDA"}]
    assert ratios(rows, {"hf": ["adamw"], "ref": ["adalomo"]}) == [
        {"name": "adamw", "baseline": "hf", "tokens_ratio": 1.5, "memory_ratio": 0.5},
        {"name": "adalomo", "baseline": "ref", "tokens_ratio": None, "memory_ratio": None}]
    markdown = render_markdown(rows, "t", {}, references={"hf": ["adamw"]})
    assert "| adamw | hf | 1.50 | 0.50 |" in markdown


def test_a_baseline_trains_the_configurations_model_outside_collie(tmp_path):
    """hf_adamw on the quickstart model: a transformers LlamaForCausalLM of the tiny card's size."""
    from collie.bench.runner import run_baseline
    grid = load_grid(write(tmp_path / "g.yaml", f"""
base: {os.path.join(ROOT, "configs", "quickstart.yaml")}
warmup_steps: 1
steps: 2
overrides: [train.micro_batch_size=4, data.seq_len=32, train.device=cpu]
configs: [{{name: adamw}}]
baselines: [{{name: hf, kind: hf_adamw, against: [adamw]}}]
"""))
    row = run_baseline(grid.baselines[0], grid, str(tmp_path))
    assert row["status"] == "ok" and row["timed_steps"] == 2 and row["layout"] == "baseline of adamw"
    assert row["params"] == 857216 and row["optimizer"] == "transformers + torch AdamW"
    assert row["tokens_per_s_per_gpu"] == pytest.approx(4 * 32 / row["step_time_s"])
    assert 0 < row["final_loss"] < 10 and 0.05 < row["peak_mem_gib"] < 8


def test_repeat_rotates_the_order_and_reports_the_median_round(tmp_path, monkeypatch):
    calls = []

    def fake(item, grid, out_dir):
        calls.append(item.name)
        return {"name": item.name, "status": "ok", "step_time_s": float(len(calls)), "tokens_per_s_per_gpu": 1.0,
                "peak_mem_gib": 1.0}
    monkeypatch.setattr("collie.bench.runner.run_one", fake)
    monkeypatch.setattr("collie.bench.runner.run_baseline", fake)
    out = tmp_path / "out"
    assert bench_main([FUSED, "--only", "adamw", "lomo", "--repeat", "3", "--no-plot", "--out", str(out)]) == 0
    assert calls == ["adamw", "lomo", "hf-adamw", "lomo-optim-lomo",
                     "lomo", "hf-adamw", "lomo-optim-lomo", "adamw",
                     "hf-adamw", "lomo-optim-lomo", "adamw", "lomo"]
    rows = {r["name"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["adamw"]["step_time_s"] == "8.0" and rows["lomo"]["step_time_s"] == "5.0"  # of 1, 8, 11 / 2, 5, 12
    assert "3 rounds over the grid in rotated orders" in (out / "results.md").read_text()


def test_summary_excludes_warmup_steps_and_takes_medians(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s, "step_time_s": t, "tokens_per_s_per_gpu": 1000 / t, "mfu": None,
             "peak_mem_gib": m} for s, t, m in [(1, 9.0, 7.0), (2, 8.0, 1.0), (3, 1.0, 1.5), (4, 3.0, 1.2),
                                                (5, 2.0, 1.1)]]
    rows.append({"step": 5, "eval/loss": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run_info.json").write_text(json.dumps({"num_params": 10, "num_trainable": 4}))
    summary = summarise(str(tmp_path), warmup_steps=2)
    assert summary["step_time_s"] == 2.0 and summary["tokens_per_s_per_gpu"] == 500.0
    assert summary["peak_mem_gib"] == 1.5 and summary["timed_steps"] == 3 and summary["mfu"] is None
    assert summary["final_loss"] == 0.0 and summary["eval_loss"] == 0.5
    assert (summary["params"], summary["trainable_params"]) == (10, 4)


def test_a_failing_configuration_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise DistributedRunError("rank 0 of 1 exited with code 1:\nRuntimeError: CUDA out of memory")
    monkeypatch.setattr("collie.bench.runner.run_distributed", fail)
    grid = load_grid(LAYOUTS, only=["dp1"])
    row = run_one(grid.runs[0], grid, str(tmp_path))
    assert row["status"] == "failed: RuntimeError: CUDA out of memory" and row["layout"] == "dp1 tp1 pp1 zero0"
    assert bench_main([LAYOUTS, "--only", "dp1", "--out", str(tmp_path / "out")]) == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["status"] for r in rows] == ["failed: RuntimeError: CUDA out of memory"]


def test_cli_dispatches_bench_and_reports_bad_input(capsys):
    assert main(["bench", LAYOUTS, "--dry-run", "--only", "dp2"]) == 0
    assert "dp2: 2 rank(s), dp2 tp1 pp1 zero0: collie train" in capsys.readouterr().out
    assert main(["bench", "missing.yaml"]) == 2
    assert "bench grid file 'missing.yaml' does not exist" in capsys.readouterr().err


@pytest.mark.distributed
def test_bench_runs_one_process_and_two_rank_configurations(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart config names its data relative to the repository
    out = tmp_path / "bench"
    assert bench_main([LAYOUTS, "--only", "dp1", "dp2", "--warmup", "1", "--steps", "2", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"dp1", "dp2"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["timed_steps"] == "2"
        assert row["trainable_params"] == row["params"] == "857216"  # the tiny card, full fine-tuning
        assert float(row["tokens_per_s_per_gpu"]) > 0 and 0 < float(row["step_time_s"]) < 30
        assert 0.05 < float(row["peak_mem_gib"]) < 8
        assert 0 < float(row["eval_loss"]) < math.log(512) + 1 and float(row["final_loss"]) > 0
    assert rows["dp2"]["nproc"] == "2" and rows["dp2"]["layout"] == "dp2 tp1 pp1 zero0"
    logged = [json.loads(line) for line in open(out / "dp2" / "metrics.jsonl")]
    assert all(r["peak_mem_gib_max_rank"] >= r["peak_mem_gib"] for r in logged if "loss" in r)
    markdown = (out / "results.md").read_text()
    assert "| configuration | ranks |" in markdown and "| dp2 | 2 |" in markdown
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_gpu_benchmark_script_plans_the_baseline_and_collie_sides(tmp_path, monkeypatch, capsys):
    """The plan of benchmarks/run_gpu.py (the smoke run itself takes ~1 min on CPU; see docs/benchmarks.md)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_gpu", os.path.join(ROOT, "benchmarks", "run_gpu.py"))
    run_gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_gpu", run_gpu)  # its dataclasses look their module up
    spec.loader.exec_module(run_gpu)
    monkeypatch.chdir(tmp_path)  # main() moves to the repository root; this puts the test's directory back after
    monkeypatch.setattr(run_gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(run_gpu, "device_peak", lambda cuda: 989.0)
    assert run_gpu.main(["--dry-run", "--baseline", os.path.join(ROOT, "README.md"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for opt in ("adamw", "adamw_bf16", "floor", "lomo_ref", "adalomo_ref"):
        assert f"--size 1b --batch 4 --seq 2048 --opt {opt} --peak-tflops 989.0" in out
    assert "--size 7b --batch 4 --seq 2048 --ckpt --opt adalomo_ref" in out
    assert "gpu_1b.yaml monitor.peak_tflops=989.0 --out" in out and "gpu_7b.yaml" in out
    for name in ("adamw:", "adamw_bf16:", "lomo:", "adalomo:", "lora-r8:"):
        assert f"\n{name} 1 rank(s)" in out  # each grid configuration validated and listed
    assert "llama-1b" in out and "llama2-7b" in out and not (tmp_path / "comparison.md").exists()
