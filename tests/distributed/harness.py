"""Train the tiny GQA model for a few steps in a given parallel layout and report what happened.

Run as ranks (``run_distributed("tests/distributed/harness.py", N, ["dp2", "zero3", ...])``, or by hand:
``torchrun --standalone --nproc_per_node 2 tests/distributed/harness.py dp2 zero3``) or call
``train_layout(LAYOUTS["single"], ctx)`` in one process for the reference. Every layout sees the same global
batches (each dp rank takes its contiguous slice), the same initial weights and AdamW, with the loss normalised by
the step's global token count, so losses, gradient norms and final weights must equal the one-process run.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from collie.config import ParallelConfig
from collie.distributed import (clip_grad_norm_, default_init_fn, gather_full_state_dict, init_parallel,
                                parallelize, vocab_parallel_loss_sum)
from collie.distributed.launch import write_rank_result
from collie.models import ModelArgs, build_model, get_model_class
from collie.optim.registry import adamw
from collie.loss import count_loss_tokens

STEPS, GLOBAL_BATCH, SEQ, SEED, LR, EPS, MAX_NORM = 5, 8, 16, 1234, 1e-2, 1e-5, 0.5
# AdamW's eps: with the default 1e-8 an update is lr·g/(|g|+eps), which turns fp32 summation-order noise of
# ~1e-10 in the few near-zero gradient entries into ~1e-4 weight differences between layouts; 1e-5 keeps the
# comparison about parallelism (max difference seen ≤ 8e-6 against the 1e-5 tolerance). MAX_NORM clips in
# every step, so the global gradient norm must be right.

# name -> ParallelConfig fields (+ harness options: grad_accum, activation_checkpointing, tie)
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


def parallel_config(layout: dict) -> ParallelConfig:
    return ParallelConfig(**{"timeout_s": 60, **{k: v for k, v in layout.items() if k not in HARNESS_KEYS}})


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def train_layout(layout: dict, ctx) -> dict:
    """Run STEPS optimizer steps; return losses, grad norms, per-rank memory and (rank 0) the full weights."""
    cfg = parallel_config(layout)
    grad_accum = layout.get("grad_accum", 1)
    args = tiny_args(layout.get("tie", False))
    model = build_model(args, device="meta")
    init_fn = default_init_fn(get_model_class(args.architecture), args, seed=SEED)
    pm = parallelize(model, args, cfg, ctx, ctx.device, init_fn=init_fn,
                     activation_checkpointing=layout.get("activation_checkpointing", "none"))
    optimizer = adamw(pm.parameters(), lr=LR, eps=EPS)
    pm.prepare_optimizer(optimizer)
    losses, norms, memory = [], [], {}
    per_rank = GLOBAL_BATCH // ctx.dp
    for ids, labels in global_batches():
        ids, labels = (t[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank] for t in (ids, labels))
        micro = list(zip(ids.chunk(grad_accum), labels.chunk(grad_accum)))
        denominator = ctx.dp_sum(count_loss_tokens(labels)).clamp(min=1).float()
        step_loss = torch.zeros(())
        for i, (mb_ids, mb_labels) in enumerate(micro):
            if pm.runner is not None:
                step_loss += pm.runner.step(mb_ids, mb_labels, loss_denominator=denominator)
            else:
                pm.set_gradient_sync(i == len(micro) - 1)
                loss = vocab_parallel_loss_sum(pm(mb_ids), mb_labels) / denominator
                loss.backward()
                step_loss += loss.detach()
        norms.append(clip_grad_norm_(pm.parameters(), MAX_NORM, ctx).item())
        memory["grad_bytes"] = local_bytes(p.grad for p in pm.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(ctx.dp_sum(step_loss).item())
    eval_loss = {"unpadded": evaluate(pm, ctx, False),
                 "padded": evaluate(pm, ctx, True)}
    memory["param_bytes"] = local_bytes(pm.parameters())
    memory["optimizer_bytes"] = local_bytes(v for state in optimizer.state.values() for v in state.values()
                                            if torch.is_tensor(v) and v.dim() > 0)
    weights = gather_full_state_dict(pm)
    return {"losses": losses, "grad_norms": norms, "eval_loss": eval_loss, "memory": memory, "weights": weights}


@torch.no_grad()
def evaluate(pm, ctx, with_padding: bool) -> float:
    """Summed token loss of one left-padded batch (global, summed over dp) without backward."""
    ids, labels = global_batches()[0]
    mask = torch.ones_like(ids)
    if with_padding:
        mask[::2, :3] = 0  # left padding in every other sequence: exercises the attention mask on every stage
        labels = labels.masked_fill(mask == 0, -100)
    per_rank = GLOBAL_BATCH // ctx.dp
    ids, labels, mask = (t[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank] for t in (ids, labels, mask))
    pm.eval()
    if pm.runner is not None:
        loss = pm.runner.eval_forward(ids, labels, attention_mask=mask)
    else:
        loss = vocab_parallel_loss_sum(pm(ids, attention_mask=mask), labels)
    pm.train()
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
