"""Every example runs for a couple of steps on CPU: one process each, and the SFT example in a 4-rank 3D layout."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from collie.distributed.launch import run_distributed

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["train.max_steps=2", "train.micro_batch_size=8", "train.log_every=1", "train.progress_bar=false",
         "eval.max_batches=1", "eval.batch_size=16"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name data/… relative to the repository root


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, *argv: str) -> int:
    return load_example(name).main([str(a) for a in argv])


def logged_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_sft_trains_evaluates_and_answers(tmp_path, capsys):
    out = tmp_path / "sft"
    assert run_example("sft", "configs/sft_tiny.yaml", *SHORT, f"train.output_dir={out}") == 0
    printed = capsys.readouterr().out
    assert "final evaluation: loss=" in printed and "exact_match=" in printed
    assert "### Response:\n" in printed  # the generated answer follows the rendered prompt
    assert len(logged_losses(out)) == 2 and all(math.isfinite(x) for x in logged_losses(out))
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.model").is_file()


def test_pretrain_packs_caches_and_continues_text(tmp_path, capsys):
    out, cache = tmp_path / "pretrain", tmp_path / "cache"
    assert run_example("pretrain", "configs/pretrain_tiny.yaml", *SHORT, f"train.output_dir={out}",
                       f"data.cache_dir={cache}") == 0
    printed = capsys.readouterr().out
    assert "final evaluation: loss=" in printed and "In winter the valley" in printed
    assert len(list(cache.glob("*/tokens.bin"))) == 2  # train and eval corpora, tokenized once each
    assert len(logged_losses(out)) == 2


def test_custom_model_is_registered_trained_and_reloaded(tmp_path, capsys):
    out = tmp_path / "custom"
    assert run_example("custom_model", "configs/sft_tiny.yaml", *SHORT, "eval.metrics=[perplexity]",
                       f"train.output_dir={out}") == 0
    assert "reloaded QKNormLlama with 4 QK-norm attention layers" in capsys.readouterr().out
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaQKNormForCausalLM"]
    assert (out / "config.yaml").read_text().count("architecture: llama-qknorm") == 1


@pytest.mark.parametrize("argv", [
    ["c.yaml", "--nproc", "4", "parallel.tp=2", "--optimizers", "adamw", "lomo"],  # docs/guide.md
    ["c.yaml", "--optimizers", "adamw", "lomo", "parallel.tp=2", "--nproc", "4"],  # configs/sft_optimizers.yaml
    ["c.yaml", "parallel.tp=2", "--lr", "lomo=1e-2", "--nproc", "4", "--optimizers", "adamw", "lomo"]])
def test_compare_optimizers_takes_options_and_overrides_in_any_order(argv):
    args = load_example("compare_optimizers").parse_args(argv)
    assert (args.config, args.overrides, args.optimizers, args.nproc) == ("c.yaml", ["parallel.tp=2"],
                                                                         ["adamw", "lomo"], 4)


def test_compare_optimizers_plots_every_run(tmp_path, capsys):
    out = tmp_path / "compare"
    assert run_example("compare_optimizers", "configs/sft_optimizers.yaml", *SHORT, f"train.output_dir={out}",
                       "--optimizers", "adamw", "adalomo") == 0
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines() if line.startswith(("adamw ", "adalomo "))] == \
        ["adamw", "adalomo"]
    assert (out / "comparison.png").stat().st_size > 10_000
    for name in ("adamw", "adalomo"):
        assert len(logged_losses(out / name)) == 2
        assert f"name: {name}" in (out / name / "config.yaml").read_text()


@pytest.mark.distributed
def test_sft_in_a_3d_layout_on_four_ranks(tmp_path):
    out = tmp_path / "sft3d"
    run_distributed(str(ROOT / "examples" / "sft.py"), 4,
                    ["configs/sft_3d.yaml", *SHORT, f"train.output_dir={out}"],
                    timeout_s=180)
    assert "layout dp=1 tp=2 pp=2 zero=3" in (out / "train.log").read_text()
    losses = logged_losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # rank 0 alone writes metrics
    assert (out / "final" / "config.json").is_file()
