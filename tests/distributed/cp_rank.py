"""Context-parallel attention against full attention, for ``test_context_parallel.py``: a rank script
(``run_distributed(..., [case, ...])``) that runs each case's tiny model once on the whole sequence and once
split over the cp ranks (``ContextParallel``), and reports the largest differences of the summed loss and of the
gradients (summed over cp, as data parallelism does)."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from collie.distributed.context_parallel import ContextParallel
from collie.distributed.launch import write_rank_result
from collie.loss import causal_lm_loss_sum, token_loss_sum
from collie.models import ModelArgs, build_model

SEED, BATCH, VOCAB = 7, 2, 128
# name -> (architecture overrides, sequence length, packed documents, right padding); the first two need no mask
CASES = {
    "causal": ({}, 16, False, False),
    "padded_odd_length": ({}, 13, False, True),  # padded to a multiple of 2·cp inside the split
    "documents": ({}, 16, True, False),
    "sliding_window_documents": ({"sliding_window": 5}, 16, True, True),
    "softcapped": ({"attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 16}, 16, False, False),
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
    overrides, seq, packed, padded = CASES[case]
    model, data = tiny_model(overrides), batch(seq, packed, padded)
    expected_loss, expected_grads = reference(model, data, packed)
    plan = ContextParallel(mesh)
    plan.apply(model)
    shard = plan.shard(data, document_masking=packed)
    with plan.attending(shard):
        loss = token_loss_sum(model(shard.input_ids, position_ids=shard.position_ids), shard.targets)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.get_group())
    grad_diff = 0.0
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=mesh.get_group())
        grad_diff = max(grad_diff, (p.grad - expected_grads[name]).abs().max().item())
    unsplit = causal_lm_loss_sum(model(data["input_ids"], position_ids=data["position_ids"]), data["labels"])
    return {"loss": total.item(), "expected_loss": expected_loss.item(), "grad_diff": grad_diff,
            "tokens": shard.input_ids.shape[1], "unsplit_runs_whole": unsplit.shape == (),
            "masked": bool(shard._masks)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cp_mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    write_rank_result({case: run(case, cp_mesh) for case in sys.argv[1:]})
    dist.destroy_process_group()
