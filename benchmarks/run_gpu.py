"""collie against plain transformers on the same model shapes, measured in one run on one machine.

    python benchmarks/run_gpu.py --out outputs/bench_gpu          # ~1B and 7B Llama, seq 2048, batch 4, one GPU
    python benchmarks/run_gpu.py --smoke --out outputs/bench_smoke  # the same pipeline on the tiny model (runs on CPU)
    python benchmarks/run_gpu.py --dry-run                          # print the commands only

For each suite it runs the Hugging Face baseline (``hf_baseline.py`` from the shared bench folder: plain
``LlamaForCausalLM`` with torch AdamW, the forward+backward floor and the lomo-optim references), one process
per configuration, then ``collie bench`` on the suite's grid (``configs/bench/gpu_1b.yaml``, ``gpu_7b.yaml``),
and writes ``comparison.md``: collie / baseline ratios of tokens/s, MFU and peak memory, the figures that
carry over between machines. Both sides use the same device peak for MFU. Without CUDA the baseline (which
needs a GPU) is skipped and noted.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_CANDIDATES = [os.path.join(ROOT, "shared", "bench", "hf_baseline.py"), "/work/shared/bench/hf_baseline.py"]
# the tiny model on the shipped pretraining sample instead of 1B/7B at seq 2048 (CPU-sized)
SMOKE_OVERRIDES = ["model.card=tiny", "model.arch={vocab_size: 1000}", "data.seq_len=128",
                   "model.activation_checkpointing=none"]
SMOKE_CPU_OVERRIDES = ["model.dtype=float32", "train.precision=fp32"]
SMOKE_HF_ARGS = ["--size", "tiny", "--batch", "4", "--seq", "128", "--steps", "4"]


@dataclass
class Suite:
    name: str
    grid: str
    hf_args: list[str]
    hf_opts: list[str]
    pairs: list[tuple[str, str]]  # (collie configuration, baseline --opt) compared in comparison.md
    memory_pairs: tuple = ()  # (configuration, configuration): peak-memory ratios within collie


SUITES = [
    Suite("1b", "configs/bench/gpu_1b.yaml", ["--size", "1b", "--batch", "4", "--seq", "2048"],
          ["adamw", "adamw_bf16", "floor", "lomo_ref", "adalomo_ref"],
          [("adamw", "adamw"), ("adamw_bf16", "adamw_bf16"), ("lomo", "lomo_ref"), ("lomo", "floor"),
           ("adalomo", "adalomo_ref"), ("adalomo", "floor")]),
    Suite("7b", "configs/bench/gpu_7b.yaml", ["--size", "7b", "--batch", "4", "--seq", "2048", "--ckpt"],
          ["floor", "lomo_ref", "adalomo_ref"],
          [("lomo", "lomo_ref"), ("lomo", "floor"), ("adalomo", "adalomo_ref"), ("adalomo", "floor")],
          memory_pairs=(("lora-r8", "adalomo"),)),
]


def main(argv=None) -> int:
    options = parse_args(argv)
    options.out = os.path.abspath(options.out)
    options.baseline = options.baseline and os.path.abspath(options.baseline)
    os.chdir(ROOT)  # the job configs name their data relative to the repository
    if not options.dry_run:
        os.makedirs(options.out, exist_ok=True)
    cuda = cuda_available()
    peak = options.peak_tflops or device_peak(cuda)
    lines, notes = [], []
    for suite in (s for s in SUITES if s.name in options.suites):
        hf_rows = run_baseline(suite, options, cuda, peak)
        collie_rows = run_collie(suite, options, cuda, peak)
        lines += compare(suite, collie_rows, hf_rows, cuda)
        notes += memory_ratios(suite, collie_rows)
    if not options.dry_run:
        write_comparison(options.out, lines, notes, options.smoke, peak)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("outputs", "bench_gpu"), help="results folder")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 warm-up + 2 timed steps (CPU-sized)")
    parser.add_argument("--suites", nargs="+", default=[s.name for s in SUITES], choices=[s.name for s in SUITES])
    parser.add_argument("--baseline", default=os.environ.get("COLLIE_HF_BASELINE"),
                        help="path of hf_baseline.py (default: shared/bench/hf_baseline.py)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: collie's table)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return parser.parse_args(argv)


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def device_peak(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    from collie.monitor.meters import device_peak_tflops
    return device_peak_tflops(torch.device("cuda", 0))


def baseline_path(option: str | None) -> str | None:
    for path in [option] if option else BASELINE_CANDIDATES:
        if path and os.path.isfile(path):
            return path
    return None


def run_baseline(suite: Suite, options, cuda: bool, peak: float | None) -> dict:
    """``hf_baseline.py`` once per --opt (one process each); {opt: its JSON line, or {'error': ...}}."""
    path = baseline_path(options.baseline)
    skip = "it needs CUDA" if not cuda else None if path else "hf_baseline.py not found (pass --baseline)"
    rows, out = {}, os.path.join(options.out, f"hf_{suite.name}.jsonl")
    for opt in suite.hf_opts:
        args = SMOKE_HF_ARGS if options.smoke else suite.hf_args
        command = [sys.executable, path or "hf_baseline.py", *args, "--opt", opt,
                   *(["--peak-tflops", str(peak)] if peak else [])]
        print("$ " + shlex.join(command) + (f"    # skipped: {skip}" if skip else ""), flush=True)
        if not (skip or options.dry_run):
            rows[opt] = run_json_command(command)
            with open(out, "a") as f:
                f.write(json.dumps({"opt": opt, **rows[opt]}) + "\n")
    return rows


def run_json_command(command: list[str]) -> dict:
    """The last JSON line the command prints, or its error (an OOM of one configuration is a result too)."""
    result = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (result.stderr or result.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"exit code {result.returncode}"}


def run_collie(suite: Suite, options, cuda: bool, peak: float | None) -> dict:
    """``collie bench`` on the suite's grid; {configuration name: its results.csv row}."""
    from collie.bench.cli import bench_main
    out = os.path.join(options.out, f"collie_{suite.name}")
    overrides = [f"monitor.peak_tflops={peak}"] if peak else []
    if options.smoke:
        overrides += SMOKE_OVERRIDES + ([] if cuda else SMOKE_CPU_OVERRIDES)
    argv = [os.path.join(ROOT, suite.grid), *overrides, "--out", out]
    if options.smoke:
        argv += ["--warmup", "1", "--steps", "2"]
    print("$ collie bench " + shlex.join(argv), flush=True)
    if options.dry_run:
        bench_main(argv + ["--dry-run"])  # validates every configuration of the grid
        return {}
    if bench_main(argv) == 2:  # bad input: nothing ran (1 = some configurations failed; their rows say why)
        raise SystemExit(f"collie bench {suite.grid} rejected its input")
    with open(os.path.join(out, "results.csv")) as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def compare(suite: Suite, collie_rows: dict, hf_rows: dict, cuda: bool) -> list[str]:
    """Markdown rows: collie vs baseline for each pair of the suite."""
    lines = []
    for name, opt in suite.pairs:
        ours, theirs = collie_rows.get(name, {}), hf_rows.get(opt, {})
        ours_tok, ours_mfu, ours_mem = (_float(ours.get(k)) for k in ("tokens_per_s_per_gpu", "mfu", "peak_mem_gib"))
        hf_tok, hf_mfu, hf_mem = (_float(theirs.get(k)) for k in ("tok_s", "mfu", "peak_gib"))
        status = ours.get("status", "not run")
        if theirs.get("error"):
            status += f"; baseline: {theirs['error']}"
        elif not theirs:
            status += "; baseline not run" + ("" if cuda else " (no CUDA)")
        lines.append(f"| {suite.name} | {name} | {opt} | {_fmt(ours_tok, '{:,.0f}')} | {_fmt(hf_tok, '{:,.0f}')} | "
                     f"{_ratio(ours_tok, hf_tok)} | {_fmt(ours_mfu, '{:.1%}')} | {_fmt(hf_mfu, '{:.1%}')} | "
                     f"{_fmt(ours_mem, '{:.2f}')} | {_fmt(hf_mem, '{:.2f}')} | {_ratio(ours_mem, hf_mem)} | {status} |")
    return lines


def memory_ratios(suite: Suite, collie_rows: dict) -> list[str]:
    notes = []
    for a, b in suite.memory_pairs:
        ratio = _ratio(*(_float(collie_rows.get(n, {}).get("peak_mem_gib")) for n in (a, b)))
        notes.append(f"- {suite.name}: peak memory {a} / {b} = {ratio}")
    return notes


def write_comparison(out: str, lines: list[str], notes: list[str], smoke: bool, peak: float | None) -> None:
    from collie.bench.report import environment
    env = ", ".join(f"{k} {v}" for k, v in environment().items())
    header = ("| suite | collie | baseline --opt | collie tok/s/GPU | HF tok/s | ratio | collie MFU | HF MFU | "
              "collie peak GiB | HF peak GiB | ratio | status |\n" + "|---" * 12 + "|\n")
    text = (f"# collie vs Hugging Face baseline{' (smoke: tiny model)' if smoke else ''}\n\n{env}; "
            f"MFU peak {peak or 'n/a'} TFLOP/s\n\n" + header + "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n")
    path = os.path.join(out, "comparison.md")
    with open(path, "w") as f:
        f.write(text)
    print(text + f"\nwrote {path}")


def _float(value):
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _fmt(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}" if ours and theirs else "–"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # run from a checkout without installing
    sys.exit(main())
