"""Context-parallel attention against full attention, for ``test_context_parallel.py``: a rank script
(``run_distributed(..., [case, ...])``) that runs each case's tiny model once on the whole sequence and once
split over the cp ranks (``ContextParallel``), and reports the largest differences of the summed loss and of the
gradients (summed over cp, as data parallelism does)."""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from collie.distributed.activation_checkpointing import apply_activation_checkpointing
from collie.distributed.context_parallel import ContextParallel
from collie.distributed.launch import write_rank_result
from collie.loss import causal_lm_loss_sum, token_loss_sum
from collie.models import ModelArgs, build_model

SEED, BATCH, VOCAB = 7, 2, 128
# name -> (architecture overrides, sequence length, packed documents, right padding[, how it runs]); only the
# soft-capped scores need an (s/cp × s) mask. "checkpointed": activation checkpointing recomputes attention in
# backward; "autocast": bf16 autocast over fp32 weights, as train.precision=bf16 runs (rotary keeps q/k in fp32)
CASES = {
    "causal": ({}, 16, False, False),
    "padded_odd_length": ({}, 13, False, True),  # padded to a multiple of 2·cp inside the split
    "documents": ({}, 16, True, False),
    "sliding_window_documents": ({"sliding_window": 5}, 16, True, True),
    "softcapped": ({"attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 16}, 16, False, False),
    "scaled_checkpointed": ({"query_pre_attn_scalar": 16}, 16, True, False, "checkpointed"),
    "autocast": ({}, 16, False, False, "autocast"),
}


def tiny_model(overrides: dict):
    args = ModelArgs(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
    model = build_model(args, device="cpu")
    model.init_weights(SEED)
    return model


def batch(seq: int, packed: bool, padded: bool) -> dict:
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, VOCAB, (BATCH, seq), generator=generator)
    positions = torch.arange(seq).repeat(BATCH, 1)
    if packed:  # row 0: documents of 6 and 10 tokens; row 1: 3, 9 and 4
        positions[0] = torch.cat([torch.arange(6), torch.arange(seq - 6)])
        positions[1] = torch.cat([torch.arange(3), torch.arange(9), torch.arange(seq - 12)])
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def reference(model, data: dict, packed: bool) -> tuple[torch.Tensor, dict]:
    from collie.data.pretrain import document_ids
    inputs = {"position_ids": data["position_ids"], "attention_mask": data["attention_mask"]}
    if packed:
        inputs["document_ids"] = document_ids(data["position_ids"])
    loss = causal_lm_loss_sum(model(data["input_ids"], **inputs), data["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), grads


def run(case: str, mesh) -> dict:
    overrides, seq, packed, padded, *how = CASES[case]
    model, data = tiny_model(overrides), batch(seq, packed, padded)
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if how == ["autocast"] else contextlib.nullcontext()
    with precision:
        expected_loss, expected_grads = reference(model, data, packed)
    if how == ["checkpointed"]:
        apply_activation_checkpointing(model, "full")
    plan = ContextParallel(mesh)
    plan.apply(model)
    shard = plan.shard(data, document_masking=packed)
    with plan.through_backward():  # as the engine runs a step: backward may recompute attention
        with plan.attending(shard), precision:
            loss = token_loss_sum(model(shard.input_ids, position_ids=shard.position_ids), shard.targets)
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_group())
    grad_diff, grad_max = 0.0, 0.0
    for name, p in model.named_parameters():
        name = name.replace("._checkpoint_wrapped_module", "")
        dist.all_reduce(p.grad, group=mesh.get_group())
        grad_diff = max(grad_diff, (p.grad - expected_grads[name]).abs().max().item())
        grad_max = max(grad_max, expected_grads[name].abs().max().item())
    unsplit = causal_lm_loss_sum(model(data["input_ids"], position_ids=data["position_ids"]), data["labels"])
    return {"loss": total.item(), "expected_loss": expected_loss.item(), "grad_diff": grad_diff, "grad_max": grad_max,
            "tokens": shard.input_ids.shape[1], "unsplit_runs_whole": unsplit.shape == (),
            "masked": bool(shard._masks)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    write_rank_result({case: run(case, cp_mesh) for case in sys.argv[1:]})
    dist.destroy_process_group()
