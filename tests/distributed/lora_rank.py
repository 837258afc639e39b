"""LoRA training in parallel layouts through collie's engine, for ``test_lora_tp.py``: a rank script
(``run_distributed(..., [layout, ...])``) or, called in one process, the reference. Every layout is a job
configuration (configs/quickstart.yaml with the tiny model, ``peft.method=lora`` and AdamW) built by
``build_engine``: the same initial weights and adapters (``train.seed``), the same global batches (each dp rank
takes its slice) and the same AdamW steps."""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed

from collie.builders import build_model_args
from collie.config import CollieConfig
from collie.distributed import init_parallel
from collie.distributed.launch import write_rank_result
from collie.engine import build_engine
from collie.models import ModelArgs

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "quickstart.yaml")
# eps=1e-5 (as in harness.py): with 1e-8, Adam turns round-off in near-zero gradients into lr-sized steps
STEPS, BATCH, SEQ, SEED, LR, EPS = 4, 4, 12, 1234, 1e-2, 1e-5
LORA = dict(r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj", "lm_head"])
LAYOUTS = {"single": {}, "tp2": {"tp": 2}, "tp2_sp": {"tp": 2, "sequence_parallel": True},
           "zero3": {"dp": 2, "zero_stage": 3}, "pp2": {"pp": 2, "pp_microbatches": 2},
           "dp2_tp2": {"dp": 2, "tp": 2}}


def tiny_args() -> ModelArgs:
    return ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def job_config(layout: str) -> CollieConfig:
    """The layout as a job: LoRA on every linear, AdamW without clipping, a constant learning rate."""
    parallel = {"timeout_s": 60, **LAYOUTS[layout]}
    per_rank = BATCH // parallel.get("dp", 1)
    overrides = {
        **{f"parallel.{key}": value for key, value in parallel.items()},
        "model.arch": dataclasses.asdict(tiny_args()),
        **{f"peft.{key}": value for key, value in {"method": "lora", **LORA}.items()},
        "optim.name": "adamw", "optim.lr": LR, "optim.args": {"eps": EPS}, "optim.weight_decay": 0.0,
        "optim.clip_grad_norm": 0.0, "optim.scheduler": "constant", "optim.warmup_steps": 0,
        "train.seed": SEED, "train.device": "cpu", "train.micro_batch_size": per_rank, "data.seq_len": SEQ,
        "eval.batch_size": per_rank,
    }
    return CollieConfig.load(QUICKSTART, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def train(layout: str) -> dict:
    """STEPS AdamW steps of LoRA training: global losses, trainable names and (rank 0) the adapter weights."""
    cfg = job_config(layout)
    ctx = init_parallel(cfg.parallel, "cpu")
    engine = build_engine(cfg, ctx, build_model_args(cfg.model))
    generator = torch.Generator().manual_seed(SEED)
    losses, per_rank = [], BATCH // ctx.dp
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (BATCH, SEQ), generator=generator)[ctx.dp_rank * per_rank:][:per_rank]
        step = engine.train_step([{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}])
        assert step.result.finite
        losses.append(step.loss.item())
    trainable = sorted({name for part in engine.parts for name, p in part.named_parameters() if p.requires_grad})
    adapter = {k: v.tolist() for k, v in engine.full_state_dict().items() if ".lora_" in k}
    return {"losses": losses, "trainable": trainable, "adapter": adapter}


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_rank_result({layout: train(layout) for layout in sys.argv[1:]})
    torch.distributed.destroy_process_group()
