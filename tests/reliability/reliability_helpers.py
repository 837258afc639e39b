"""Shared pieces of the reliability tests: a small quickstart config, the fault worker, metrics readers."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")
# a 2-layer, 64-wide tiny model on the shipped quickstart data; AdamW eps 1e-5 as in tests/distributed
COMMON = [
    "model.arch={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}", "train.log_every=1",
    "train.progress_bar=false", "checkpoint.save_final=false", "eval.before_training=false", "eval.every_steps=0",
    "eval.metrics=[perplexity]", "eval.max_batches=2", "eval.batch_size=4", "optim.warmup_steps=0",
    "optim.scheduler=constant", "optim.args={eps: 1e-5}", "monitor.sinks=[jsonl]", "data.seq_len=48",
    f"data.train_files=[{ROOT}/data/quickstart/train.jsonl]", f"data.eval_files=[{ROOT}/data/quickstart/eval.jsonl]",
    f"data.tokenizer={ROOT}/data/quickstart/tokenizer.model",
]


def overrides(output_dir, *extra, global_batch: int = 8, dp: int = 1) -> list[str]:
    return [*COMMON, f"train.micro_batch_size={global_batch // dp}", f"train.output_dir={output_dir}", *extra]


def worker_args(output_dir, *extra, faults=(), global_batch: int = 8, dp: int = 1) -> list[str]:
    """Arguments of fault_worker.py: fault specs, then ``train CONFIG overrides…``."""
    return [*(f"--fault={f}" for f in faults), "train", QUICKSTART,
            *overrides(output_dir, *extra, global_batch=global_batch, dp=dp)]


def metric_rows(output_dir) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def losses_by_step(output_dir) -> dict[int, float]:
    """step → loss from metrics.jsonl (a resumed run appends; a repeated step keeps its last value)."""
    return {r["step"]: r["loss"] for r in metric_rows(output_dir) if "loss" in r}


def python() -> str:
    return sys.executable
