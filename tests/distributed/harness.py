"""Train the tiny GQA model for a few steps in a given parallel layout through collie's engine and report what
happened.

Run as ranks (``run_distributed("tests/distributed/harness.py", N, ["dp2", "zero3", ...])``, or by hand:
``torchrun --standalone --nproc_per_node 2 tests/distributed/harness.py dp2 zero3``) or call
``train_layout(LAYOUTS["single"], ctx)`` in one process for the reference. Each layout is a job configuration
(``job_config``: the quick start's, with this harness's model, AdamW and clipping) run by ``build_engine``, step by
step as the Trainer's ``train_fn`` does. Every layout sees the same global batches (each dp rank takes its
contiguous slice), the same initial weights (``train.seed``) and AdamW, with the loss normalised by the step's
global token count, so losses, gradient norms and final weights must equal the one-process run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from collie.builders import build_model_args
from collie.config import CollieConfig, ParallelConfig
from collie.distributed import init_parallel
from collie.distributed.launch import write_rank_result
from collie.engine import build_engine
from collie.models import ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
STEPS, GLOBAL_BATCH, SEQ, SEED, LR, EPS, MAX_NORM = 5, 8, 16, 1234, 1e-2, 1e-5, 0.5
# AdamW's eps: with the default 1e-8 an update is lr·g/(|g|+eps), which turns fp32 summation-order noise of
# ~1e-10 in the few near-zero gradient entries into ~1e-4 weight differences between layouts; 1e-5 keeps the
# comparison about parallelism (max difference seen ≤ 8e-6 against the 1e-5 tolerance). MAX_NORM clips in
# every step, so the global gradient norm must be right.

# name -> parallel.* keys (+ harness options: grad_accum, activation_checkpointing, tie)
LAYOUTS = {
    "single": {},
    "single_tied": {"tie": True},
    "dp2": {"dp": 2},
    "dp2_ga2": {"dp": 2, "grad_accum": 2},
    "zero1": {"dp": 2, "zero_stage": 1},
    "zero2": {"dp": 2, "zero_stage": 2, "grad_accum": 2},
    "zero3": {"dp": 2, "zero_stage": 3, "activation_checkpointing": "full"},
    "zero2_offload": {"dp": 2, "zero_stage": 2, "cpu_offload": True},
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "tp2_tied": {"tp": 2, "tie": True},
    "zero3_tied": {"dp": 2, "zero_stage": 3, "tie": True},
    "pp2_1f1b": {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2, "activation_checkpointing": "selective"},
    "pp2_gpipe": {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4, "grad_accum": 2},
    "pp2_interleaved": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 4},
    "dp2_tp2": {"dp": 2, "tp": 2, "zero_stage": 1},
    "dp2_tp2_zero3_sp": {"dp": 2, "tp": 2, "zero_stage": 3, "sequence_parallel": True},
    "dp2_pp2_zero2": {"dp": 2, "pp": 2, "zero_stage": 2, "pp_microbatches": 2, "grad_accum": 2},
    "dp2_pp2_zero3": {"dp": 2, "pp": 2, "zero_stage": 3, "pp_microbatches": 2},
    "tp2_pp2": {"tp": 2, "pp": 2, "pp_microbatches": 2, "pp_split": "balanced"},
    "dp2_tp2_pp2": {"dp": 2, "tp": 2, "pp": 2, "zero_stage": 3, "pp_schedule": "interleaved_1f1b",
                    "pp_microbatches": 2},
}
HARNESS_KEYS = ("grad_accum", "activation_checkpointing", "tie")


def tiny_args(tie: bool = False) -> ModelArgs:
    return ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=tie)


def job_config(layout: dict) -> CollieConfig:
    """The layout as a job: configs/quickstart.yaml with dotted overrides, as on the command line."""
    grad_accum = layout.get("grad_accum", 1)
    parallel = {"timeout_s": 60, **{k: v for k, v in layout.items() if k not in HARNESS_KEYS}}
    per_rank = GLOBAL_BATCH // parallel.get("dp", 1)
    overrides = {
        **{f"parallel.{key}": value for key, value in parallel.items()},
        "model.arch": dataclasses.asdict(tiny_args(layout.get("tie", False))),
        "model.activation_checkpointing": layout.get("activation_checkpointing", "none"),
        "optim.name": "adamw", "optim.lr": LR, "optim.args": {"eps": EPS}, "optim.weight_decay": 0.0,
        "optim.clip_grad_norm": MAX_NORM, "optim.scheduler": "constant", "optim.warmup_steps": 0,
        "train.seed": SEED, "train.device": "cpu", "train.micro_batch_size": per_rank // grad_accum,
        "train.grad_accum_steps": grad_accum, "data.seq_len": SEQ, "eval.batch_size": per_rank,
    }
    return CollieConfig.load(QUICKSTART, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def parallel_config(layout: dict) -> ParallelConfig:
    return job_config(layout).parallel


def global_batches():
    """STEPS fixed (input_ids, labels) global batches; some labels are ignored so token counts differ by rank."""
    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=generator)
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=generator) < 0.25] = -100
        labels[: GLOBAL_BATCH // 2, : SEQ // 2] = -100  # first half of the batch has fewer loss tokens
        batches.append((ids, labels))
    return batches


def rank_batch(ctx, ids, labels, mask=None) -> dict:
    """This dp rank's contiguous slice of a global batch, as the engine takes it."""
    mask = torch.ones_like(ids) if mask is None else mask
    per_rank = GLOBAL_BATCH // ctx.dp
    ids, labels, mask = (t[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank] for t in (ids, labels, mask))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def split(batch: dict, n: int) -> list[dict]:
    return [dict(zip(batch, parts)) for parts in zip(*(t.chunk(n) for t in batch.values()))]


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def train_layout(layout: dict, ctx) -> dict:
    """Run STEPS optimizer steps; return losses, grad norms, per-rank memory and (rank 0) the full weights."""
    cfg = job_config(layout)
    engine = build_engine(cfg, ctx, build_model_args(cfg.model))
    losses, norms, memory = [], [], {}
    for ids, labels in global_batches():
        batch = rank_batch(ctx, ids, labels)
        def measure_gradients():  # before the update zeroes them (and ZeRO-1 drops the unowned ones in its pre-hook)
            memory["grad_bytes"] = local_bytes(p.grad for p in engine.parameters() if p.grad is not None)

        step = engine.train_step(split(batch, cfg.train.grad_accum_steps), on_gradients=measure_gradients)
        assert step.result.finite, f"non-finite step: loss {float(step.loss)}, grad norm {step.result.grad_norm}"
        losses.append(step.loss.item())
        norms.append(step.result.grad_norm)
    eval_loss = {"unpadded": evaluate(engine, ctx, False), "padded": evaluate(engine, ctx, True)}
    memory["param_bytes"] = local_bytes(engine.parameters())
    memory["optimizer_bytes"] = local_bytes(v for state in engine.optimizer.state.values() for v in state.values()
                                            if torch.is_tensor(v) and v.dim() > 0)
    weights = engine.full_state_dict()
    return {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "memory": memory, "weights": weights}


@torch.no_grad()
def evaluate(engine, ctx, with_padding: bool) -> float:
    """Summed token loss of one left-padded batch (global, summed over dp) without backward."""
    ids, labels = global_batches()[0]
    mask = torch.ones_like(ids)
    if with_padding:
        mask[::2, :3] = 0  # left padding in every other sequence: exercises the attention mask on every stage
        labels = labels.masked_fill(mask == 0, -100)
    engine.eval()
    loss = engine.loss_sum(rank_batch(ctx, ids, labels, mask))
    engine.train()
    return ctx.dp_sum(loss).item()


def main(names: list[str]) -> None:
    """Run the named layouts one after the other in this rank; under plain torchrun rank 0 prints a summary."""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out_dir = os.environ.get("COLLIE_RESULT_DIR")
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            result = train_layout(LAYOUTS[name], init_parallel(parallel_config(LAYOUTS[name]), "cpu"))
        except Exception as error:  # report it and go on with the next layout of this launch
            results[name] = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"}
            continue
        weights = result.pop("weights")
        result["seconds"] = time.perf_counter() - start
        if rank == 0 and out_dir is not None:
            result["weights_path"] = os.path.join(out_dir, f"{name}.weights.pt")
            torch.save(weights, result["weights_path"])
        results[name] = result
    write_rank_result(results)
    if rank == 0 and out_dir is None:
        for name, result in results.items():
            print(f"{name}: {result.get('error') or {k: result[k] for k in ('losses', 'grad_norms', 'memory')}}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
