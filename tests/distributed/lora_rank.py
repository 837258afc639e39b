"""LoRA training in parallel layouts, for ``test_lora_tp.py``: a rank script (``run_distributed(...,
[layout, ...])``) or, called in one process, the reference. Every layout starts from the same weights and
adapters, sees the same global batches (each dp rank takes its slice) and runs the same AdamW steps."""
from __future__ import annotations

import sys

import torch
import torch.distributed

from collie.config import ParallelConfig
from collie.distributed import gather_full_state_dict, init_parallel, parallelize, vocab_parallel_loss_sum
from collie.distributed.launch import write_rank_result
from collie.models import ModelArgs, build_model
from collie.optim.registry import adamw
from collie.peft import apply_lora, trainable_parameters
from collie.loss import count_loss_tokens

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


def initial_state() -> dict:
    """The one-process model with LoRA, as a full CPU state dict (what rank 0 broadcasts)."""
    model = build_model(tiny_args(), device="cpu", seed=SEED)
    apply_lora(model, seed=SEED, **LORA)
    return model.state_dict()


def train(layout: str) -> dict:
    """STEPS AdamW steps of LoRA training: global losses, trainable names and (rank 0) the adapter weights."""
    ctx = init_parallel(ParallelConfig(timeout_s=60, **LAYOUTS[layout]), "cpu")
    model = build_model(tiny_args(), device="meta")
    apply_lora(model, seed=SEED, **LORA)  # on meta: the factors get their values from initial_state
    pm = parallelize(model, model.args, ctx.cfg, ctx, ctx.device, init_fn=initial_state)
    optimizer = adamw(trainable_parameters(pm), lr=LR, eps=EPS)
    generator = torch.Generator().manual_seed(SEED)
    losses, per_rank = [], BATCH // ctx.dp
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (BATCH, SEQ), generator=generator)[ctx.dp_rank * per_rank:][:per_rank]
        denominator = ctx.dp_sum(count_loss_tokens(ids)).float()
        if pm.runner is not None:
            loss = pm.runner.step(ids, ids, loss_denominator=denominator)
        else:
            loss = vocab_parallel_loss_sum(pm(ids), ids) / denominator
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(ctx.dp_sum(loss).item())
    trainable = sorted(name for name, p in pm.named_parameters() if p.requires_grad)
    adapter = {k: v.tolist() for k, v in gather_full_state_dict(pm).items() if ".lora_" in k}
    return {"losses": losses, "trainable": trainable, "adapter": adapter}


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_rank_result({layout: train(layout) for layout in sys.argv[1:]})
    torch.distributed.destroy_process_group()
