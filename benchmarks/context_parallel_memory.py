"""Per-rank memory of context parallelism: one forward+backward of a whole model on one row of ``--seq`` tokens in
one process (plain causal attention), and split over cp = 2 and 4 ranks (``collie.distributed.context_parallel``:
each rank holds seq/cp tokens and all-gathers keys/values in every layer).

    python benchmarks/context_parallel_memory.py                    # seq 8192, cp 2 and 4, 5M-parameter Llama
    python benchmarks/context_parallel_memory.py --seq 4096 --cp 2
    python benchmarks/context_parallel_memory.py --documents 8         # one row packing 8 equal documents

Peak: torch's ``MemTracker`` follows every tensor the step allocates on the CPU (parameters, activations, gradients,
temporaries, the gathered k/v and the attention mask) and reports the step's peak on each rank; "activations" is
that peak less the parameters and their gradients (the same on every rank). The cp ranks are local processes
(gloo), launched like torchrun by ``collie.distributed.launch.run_distributed``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def setup(seq: int, documents: int = 1):
    from collie.models import ModelArgs, build_model
    args = ModelArgs(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seq)
    model = build_model(args, device="cpu", seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(seq // documents).repeat(documents)[None]  # packed rows restart positions per document
    return model, {"input_ids": tokens, "labels": tokens, "attention_mask": torch.ones_like(tokens),
                   "position_ids": positions}


def step(model, batch, plan) -> None:
    from collie.data.pretrain import document_ids
    from collie.loss import causal_lm_loss_sum, token_loss_sum
    packed = bool((batch["position_ids"][:, 1:] == 0).any())
    if plan is None:
        inputs = {"position_ids": batch["position_ids"]}
        if packed:
            inputs["document_ids"] = document_ids(batch["position_ids"])
        loss = causal_lm_loss_sum(model(batch["input_ids"], **inputs), batch["labels"])
    else:
        shard = plan.shard(batch, document_masking=packed)
        with plan.attending(shard):
            loss = token_loss_sum(model(shard.input_ids, position_ids=shard.position_ids), shard.targets)
    loss.backward()


def peak_mib(model, batch, plan) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker
    step(model, batch, plan)  # warm-up: the allocator and lazily-built state
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step(model, batch, plan)
    peak = sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values()) / 2**20
    weights = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # parameters + gradients
    return {"peak": peak, "activations": peak - weights}


def rank_main(seq: int, documents: int) -> None:
    """One cp rank (under ``run_distributed``): its peak."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from collie.distributed.context_parallel import ContextParallel
    from collie.distributed.launch import write_rank_result
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    plan = ContextParallel(init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",)))
    model, batch = setup(seq, documents)
    plan.apply(model)
    write_rank_result(peak_mib(model, batch, plan))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--documents", type=int, default=1, help="equal documents packed in the row (masked)")
    options = parser.parse_args()
    if options.seq % options.documents:
        parser.error(f"--documents {options.documents} must divide --seq {options.seq} (documents of equal length)")
    from collie.distributed.launch import run_distributed
    torch.set_num_threads(1)
    model, batch = setup(options.seq, options.documents)
    base = peak_mib(model, batch, None)
    print(f"seq {options.seq}, one row of {options.documents} document(s), torch {torch.__version__}")
    print(f"{'layout':<8}{'peak MiB':>10}{'× one':>8}{'activations MiB':>17}{'× one':>8}")
    print(f"{'one':<8}{base['peak']:>10.0f}{1:>8.2f}{base['activations']:>17.0f}{1:>8.2f}")
    for cp in options.cp:
        arguments = ["--rank", str(options.seq), str(options.documents)]
        ranks = run_distributed(os.path.abspath(__file__), cp, arguments, timeout_s=900)
        worst = max(ranks, key=lambda r: r["peak"])
        print(f"{f'cp{cp}':<8}{worst['peak']:>10.0f}{worst['peak'] / base['peak']:>8.2f}"
              f"{worst['activations']:>17.0f}{worst['activations'] / base['activations']:>8.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
