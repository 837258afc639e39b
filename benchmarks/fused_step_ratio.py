"""Step time of LOMO and AdaLomo relative to AdamW, interleaved step by step in one process.

    python benchmarks/fused_step_ratio.py                       # the 5M-parameter Llama of configs/bench/fused_tiny.yaml
    python benchmarks/fused_step_ratio.py --rounds 30 --threads 2 optim.clip_grad_norm=1.0

Every configuration is a collie engine built as ``collie train`` builds it (``build_engine`` from the job config of
configs/bench/fused_tiny.yaml: configs/pretrain_tiny.yaml with its overrides), and a round runs one optimizer step
of each configuration, in a rotating order, on the same random batch: load from other processes on a shared
machine then falls on all configurations alike, where consecutive ``collie bench`` runs would each see a different
load. Prints the median step time of each configuration and its ratio to AdamW's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "pretrain_tiny.yaml")
COMMON = ["model.arch={vocab_size: 1000, hidden_size: 256, intermediate_size: 688, num_hidden_layers: 6}",
          "data.seq_len=256", "data.document_masking=false", "train.micro_batch_size=8", "optim.clip_grad_norm=0",
          "optim.warmup_steps=0", "train.device=cpu"]
CONFIGS = {
    "adamw": ["optim.name=adamw"],
    "lomo": ["optim.name=lomo", "optim.lr=1e-2", "optim.weight_decay=0.0"],
    "adalomo": ["optim.name=adalomo", "optim.lr=1e-2", "optim.weight_decay=0.0"],
    "lomo-two-pass": ["optim.name=lomo", "optim.lr=1e-2", "optim.weight_decay=0.0", "optim.args={guard_nonfinite: true}"],
    "adalomo-two-pass": ["optim.name=adalomo", "optim.lr=1e-2", "optim.weight_decay=0.0",
                         "optim.args={guard_nonfinite: true}"],
}


def build(overrides: list[str]):
    from collie.builders import build_model_args
    from collie.config import CollieConfig
    from collie.distributed import init_parallel
    from collie.engine import build_engine
    cfg = CollieConfig.load(BASE, overrides)
    ctx = init_parallel(cfg.parallel, "cpu")
    return cfg, build_engine(cfg, ctx, build_model_args(cfg.model))


def step(engine, batch: dict, denominator: torch.Tensor) -> float:
    """One optimizer step as the Trainer runs it (one micro-batch); its wall time in seconds."""
    start = time.perf_counter()
    engine.begin_step(1)
    loss = engine.forward_backward(batch, denominator, last=True)
    result = engine.optimizer_step(loss)
    assert result.finite
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every configuration")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each configuration)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    engines = {}
    for name in options.only:
        cfg, engines[name] = build([*COMMON, *CONFIGS[name], *options.overrides])
        engines[name].train()
    from collie.builders import build_model_args
    seq, batch_size, vocab = cfg.data.seq_len, cfg.train.micro_batch_size, build_model_args(cfg.model).vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(seq).expand(batch_size, seq)}
    denominator = torch.tensor(float(batch_size * (seq - 1)))
    times = {name: [] for name in engines}
    names = list(engines)
    for r in range(options.warmup + options.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            elapsed = step(engines[name], batch, denominator)
            if r >= options.warmup:
                times[name].append(elapsed)
    reference = statistics.median(times["adamw"]) if "adamw" in times else None
    print(f"{options.rounds} interleaved rounds, {options.threads} thread(s), batch {batch_size}×{seq}; "
          f"median step time and ratio to AdamW")
    print("| configuration | step s (median) | ÷ AdamW |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / reference:.2f}" if reference else "–"
        print(f"| {name} | {median:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
