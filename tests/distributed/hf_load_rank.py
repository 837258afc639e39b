"""Rank script for ``test_hf_loading.py``: load a Hugging Face checkpoint shard by shard into a parallel layout,
then report the bytes each rank read, the summed token loss of a fixed batch, greedy generations and (rank 0) the
gathered weights.

    python hf_load_rank.py HF_DIR LAYOUT [LAYOUT ...]   (as ranks of run_distributed)
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from collie.config import ParallelConfig
from collie.distributed import gather_full_state_dict, init_parallel, parallelize, vocab_parallel_loss_sum
from collie.distributed.hf_loading import load_hf_checkpoint
from collie.distributed.launch import write_rank_result
from collie.evaluation.generation import generate
from collie.models import build_model, load_hf_config

LAYOUTS = {"tp2_pp2": {"tp": 2, "pp": 2, "pp_microbatches": 2}, "dp2_tp2_zero3": {"dp": 2, "tp": 2, "zero_stage": 3}}
BATCH, SEQ, SEED = 4, 10, 7
PROMPTS, NEW_TOKENS = [[5, 9, 2, 7, 11], [3, 4]], 5  # two lengths: the batch is left-padded


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))


def run(hf_dir: str, layout: str) -> dict:
    ctx = init_parallel(ParallelConfig(timeout_s=60, **LAYOUTS[layout]), "cpu")
    args = load_hf_config(hf_dir)
    model = parallelize(build_model(args, device="meta"), args, ctx.cfg, ctx, ctx.device)
    read = load_hf_checkpoint(model, hf_dir)
    ids = batch(args.vocab_size)[ctx.dp_rank * BATCH // ctx.dp:][:BATCH // ctx.dp]
    with torch.no_grad():
        if model.runner is not None:
            loss = model.runner.eval_forward(ids, ids)
        else:
            loss = vocab_parallel_loss_sum(model(ids), ids)
    # greedy generation: through the pipeline's stages (tp2×pp2) or the KV-cached model (dp2×tp2 ZeRO-3)
    generator_model = model.runner.last_logits if model.runner is not None else model.parts[0]
    tokens = generate(generator_model, PROMPTS, NEW_TOKENS, eos_id=None, pad_id=0, device=ctx.device)
    weights = {k: v.tolist() for k, v in gather_full_state_dict(model).items()}
    return {"bytes_read": read, "loss_sum": ctx.dp_sum(loss.detach()).item(), "weights": weights,
            "generated": [list(map(int, t)) for t in tokens]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_rank_result({layout: run(sys.argv[1], layout) for layout in sys.argv[2:]})
    dist.barrier()
    dist.destroy_process_group()
