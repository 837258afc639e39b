"""Run one benchmark configuration as its own process group and summarise its ``metrics.jsonl``."""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import statistics

from collie.bench.baseline import KINDS
from collie.bench.grid import BaselineRun, BenchGrid, BenchRun
from collie.distributed.launch import DistributedRunError, run_distributed
from collie.errors import CollieError

logger = logging.getLogger("collie")


def bench_overrides(run_dir: str, max_steps: int) -> list[str]:
    """What every benchmark run sets: its steps and directory, a metrics row per step, no saving, one
    evaluation at the end (if the config has eval data)."""
    return [f"train.max_steps={max_steps}", f"train.output_dir={run_dir}", "train.log_every=1",
            "train.progress_bar=false", "monitor.sinks=[jsonl]", "checkpoint.every_steps=0",
            "checkpoint.save_final=false", "checkpoint.resume=null", "eval.every_steps=0",
            "eval.before_training=false"]


def run_one(run: BenchRun, grid: BenchGrid, out_dir: str) -> dict:
    """Train ``run`` for warm-up + timed steps in fresh processes; return its summary row (status 'ok' or the
    failure's last line)."""
    run_dir = os.path.abspath(os.path.join(out_dir, run.slug))
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    os.makedirs(os.path.join(run_dir, "ranks"))
    overrides = [*run.overrides, *bench_overrides(run_dir, grid.warmup_steps + grid.steps)]
    logger.info("bench %s: collie train %s %s on %d rank(s)", run.name, run.base, shlex.join(run.overrides),
                run.nproc)
    row = describe(run)
    try:
        run_distributed("collie", run.nproc, ["train", run.base, *overrides], timeout_s=grid.timeout_s,
                        threads_per_rank=grid.threads_per_rank, result_dir=os.path.join(run_dir, "ranks"))
        row.update(summarise(run_dir, grid.warmup_steps), status="ok")
    except (DistributedRunError, CollieError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        row["status"] = f"failed: {lines[-1] if lines else type(error).__name__}"
        logger.error("bench %s failed (logs in %s): %s", run.name, os.path.join(run_dir, "ranks"), error)
    return row


def run_baseline(baseline: BaselineRun, grid: BenchGrid, out_dir: str) -> dict:
    """Run a baseline (``collie.bench.baseline``) in its own process on the setting of the configuration it
    mirrors; return its row, like a configuration's."""
    mirror = baseline.mirror
    run_dir = os.path.abspath(os.path.join(out_dir, baseline.slug))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    logger.info("bench baseline %s: %s on the setting of %s", baseline.name, KINDS[baseline.kind], mirror.name)
    row = {**describe(mirror), "name": baseline.name, "layout": f"baseline of {', '.join(baseline.against)}",
           "optimizer": KINDS[baseline.kind]}
    args = [baseline.kind, mirror.base, *mirror.overrides, "--warmup", grid.warmup_steps, "--steps", grid.steps]
    try:
        result = run_distributed("collie.bench.baseline", 1, args, timeout_s=grid.timeout_s,
                                 threads_per_rank=grid.threads_per_rank, result_dir=run_dir)[0]
        row.update(result or {"status": "failed: the baseline wrote no result"})
    except DistributedRunError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        row["status"] = f"failed: {lines[-1] if lines else type(error).__name__}"
        logger.error("bench baseline %s failed (log in %s): %s", baseline.name, run_dir, error)
    return row


def describe(run: BenchRun) -> dict:
    """What the configuration is: layout, optimizer, adapter, precision."""
    cfg = run.config
    peft = f"lora r{cfg.peft.r}" if cfg.peft.method == "lora" else cfg.peft.method
    return {"name": run.name, "nproc": run.nproc, "layout": run.layout(), "optimizer": cfg.optim.name, "peft": peft,
            "dtype": cfg.model.dtype, "precision": cfg.train.precision, "micro_batch_size": cfg.train.micro_batch_size,
            "seq_len": cfg.data.seq_len}


def summarise(run_dir: str, warmup_steps: int) -> dict:
    """Medians over the timed steps (after ``warmup_steps``), the largest peak memory of any rank and step,
    the last training and evaluation loss, and the parameter counts."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise CollieError(f"{path} was not written")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "loss" in r]
    timed = [r for r in train if r["step"] > warmup_steps]
    if not timed:
        raise CollieError(f"{path}: no step after the {warmup_steps} warm-up steps was logged")
    evals = [r for r in records if "eval/loss" in r]
    info = _read_json(os.path.join(run_dir, "run_info.json"))
    return {"params": info.get("num_params"), "trainable_params": info.get("num_trainable"),
            "timed_steps": len(timed), "step_time_s": _median(timed, "step_time_s"),
            "tokens_per_s_per_gpu": _median(timed, "tokens_per_s_per_gpu"), "mfu": _median(timed, "mfu"),
            "peak_mem_gib": max(r.get("peak_mem_gib_max_rank", r["peak_mem_gib"]) for r in timed),
            "final_loss": train[-1]["loss"], "eval_loss": evals[-1]["eval/loss"] if evals else None}


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
