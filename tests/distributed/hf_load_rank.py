"""Rank script for ``test_hf_loading.py``: load a Hugging Face checkpoint shard by shard into a parallel layout,
then report the bytes each rank read and, through collie's engine, the summed token loss of a fixed batch,
greedy generations and (rank 0) the gathered weights.

    python hf_load_rank.py HF_DIR LAYOUT [LAYOUT ...]   (as ranks of run_distributed)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from collie.builders import build_model_args
from collie.config import CollieConfig
from collie.distributed import init_parallel, parallelize
from collie.distributed.hf_loading import load_hf_checkpoint
from collie.distributed.launch import write_rank_result
from collie.engine import build_engine
from collie.evaluation.generation import generate
from collie.models import build_model

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "quickstart.yaml")
LAYOUTS = {"tp2_pp2": {"tp": 2, "pp": 2, "pp_microbatches": 2}, "dp2_tp2_zero3": {"dp": 2, "tp": 2, "zero_stage": 3}}
BATCH, SEQ, SEED = 4, 10, 7
PROMPTS, NEW_TOKENS = [[5, 9, 2, 7, 11], [3, 4]], 5  # two lengths: the batch is left-padded


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))


def job_config(hf_dir: str, layout: str) -> CollieConfig:
    """The layout as a job: configs/quickstart.yaml with ``model.pretrained`` = the checkpoint."""
    parallel = {"timeout_s": 60, **LAYOUTS[layout]}
    per_rank = BATCH // parallel.get("dp", 1)
    overrides = {**{f"parallel.{key}": value for key, value in parallel.items()}, "model.pretrained": str(hf_dir),
                 "train.device": "cpu", "train.micro_batch_size": per_rank, "eval.batch_size": per_rank,
                 "data.seq_len": SEQ}
    return CollieConfig.load(QUICKSTART, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def run(hf_dir: str, layout: str) -> dict:
    cfg = job_config(hf_dir, layout)
    ctx = init_parallel(cfg.parallel, "cpu")
    args = build_model_args(cfg.model)
    # placed and loaded here rather than by build_engine, to count the bytes each rank reads
    model = parallelize(build_model(args, device="meta"), args, cfg.parallel, ctx, ctx.device)
    read = load_hf_checkpoint(model, hf_dir)
    engine = build_engine(cfg, ctx, args, model=model)
    engine.eval()
    ids = batch(args.vocab_size)[ctx.dp_rank * BATCH // ctx.dp:][:BATCH // ctx.dp]
    with torch.no_grad():
        loss = engine.loss_sum({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    # greedy generation: through the pipeline's stages (tp2×pp2) or the KV-cached model (dp2×tp2 ZeRO-3)
    generator_model, multiple = engine.generation_model()
    tokens = generate(generator_model, PROMPTS, NEW_TOKENS, eos_id=None, pad_id=0, device=ctx.device,
                      pad_to_multiple_of=multiple)
    weights = {k: v.tolist() for k, v in engine.full_state_dict().items()}
    return {"bytes_read": read, "loss_sum": ctx.dp_sum(loss.detach()).item(), "weights": weights,
            "generated": [list(map(int, t)) for t in tokens]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_rank_result({layout: run(sys.argv[1], layout) for layout in sys.argv[2:]})
    dist.barrier()
    dist.destroy_process_group()
