"""``collie bench``: run a grid of configurations for a few steps each and report throughput and memory.

    collie bench configs/bench/layouts_tiny.yaml                       # every configuration of the grid
    collie bench configs/bench/optimizers_tiny.yaml --only adamw lion  # some of them
    collie bench GRID model.card=tiny train.precision=fp32 --out outputs/smoke   # overrides for every run
    collie bench GRID --dry-run                                        # validate and list the commands

Each configuration runs as ``collie train`` in its own processes (one per rank), each baseline of the grid
(``collie.bench.baseline``: the same model in plain transformers + torch AdamW, or lomo-optim) in a process of its
own; the output folder gets one run directory per configuration and results.csv, results.md (with collie ÷
baseline ratios of tokens/s and peak memory) and results.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from collie.errors import CollieError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collie bench", description="Run a benchmark grid (YAML: a base job "
                                     "config and named override sets) and report tokens/s per GPU, MFU, peak "
                                     "memory, trainable parameters and final losses.")
    parser.add_argument("grid", help="bench grid file, e.g. configs/bench/layouts_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every configuration (last)")
    parser.add_argument("--out", help="output folder (default outputs/bench/<grid name>)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (replaces the grid's)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (replaces the grid's)")
    parser.add_argument("--no-plot", action="store_true", help="skip results.png (no matplotlib needed)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole grid this many times, each round in "
                        "a rotated order, and report each configuration's median round: on a shared machine the "
                        "load then falls on all configurations alike")
    parser.add_argument("--no-baselines", action="store_true", help="skip the grid's baselines (transformers + "
                                                                     "torch AdamW, lomo-optim)")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the commands")
    return parser


def bench_main(argv=None) -> int:
    """Entry point of ``collie bench``: 0 when every configuration ran (baselines that cannot run on this device
    are skipped), 1 when some failed, 2 on bad input."""
    options = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    try:
        return _bench(options)
    except CollieError as error:
        print(f"collie bench: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


def _bench(options) -> int:
    from collie.bench.grid import load_grid
    from collie.bench.report import require_matplotlib, write_report
    from collie.bench.runner import run_baseline, run_one
    for flag in ("steps", "warmup", "repeat"):
        value = getattr(options, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise CollieError(f"--{flag}={value} is out of range: must be >= {0 if flag == 'warmup' else 1}")
    grid = load_grid(options.grid, options.overrides, options.only, options.steps, options.warmup)
    baselines = [] if options.no_baselines else grid.baselines
    if options.dry_run:
        for run in grid.runs:
            print(f"{run.name}: {run.nproc} rank(s), {run.layout()}: collie train {run.base} "
                  f"{shlex.join(run.overrides)}")
        for baseline in baselines:
            print(f"{baseline.name}: baseline {baseline.kind} on the setting of {baseline.mirror.name}, the "
                  f"reference of {', '.join(baseline.against)}")
        return 0
    if not options.no_plot:
        require_matplotlib()  # fail before hours of runs, not after
    out_dir = options.out or os.path.join("outputs", "bench", os.path.splitext(os.path.basename(options.grid))[0])
    os.makedirs(out_dir, exist_ok=True)
    _setup_logging()
    jobs = [(run_one, run) for run in grid.runs] + [(run_baseline, baseline) for baseline in baselines]
    rounds = [[] for _ in jobs]
    for index in range(options.repeat):
        for position in [*range(index % len(jobs), len(jobs)), *range(index % len(jobs))]:
            function, item = jobs[position]
            rounds[position].append(function(item, grid, out_dir))
    rows = [median_round(results) for results in rounds]
    notes = (f"Grid `{options.grid}`; {grid.warmup_steps} warm-up step(s), then the median of {grid.steps} timed "
             f"step(s). Peak memory: the largest of any rank and timed step (CPU: the process's maximum RSS).")
    if options.repeat > 1:
        notes += (f" {options.repeat} rounds over the grid in rotated orders; each row is its configuration's "
                  f"round of median step time.")
    paths = write_report(rows, out_dir, f"collie bench: {os.path.basename(options.grid)}", notes,
                         with_plot=not options.no_plot, references={b.name: b.against for b in baselines})
    with open(paths["markdown"]) as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


def median_round(results: list[dict]) -> dict:
    """Of one configuration's rounds: the first failure, or the round of median step time (a measured row)."""
    failed = [row for row in results if row["status"] != "ok"]
    if failed:
        return failed[0]
    return sorted(results, key=lambda row: row["step_time_s"])[(len(results) - 1) // 2]


def _setup_logging() -> None:
    logger = logging.getLogger("collie")
    if not logger.handlers:
        from rich.logging import RichHandler
        logger.addHandler(RichHandler(show_path=False, markup=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False
