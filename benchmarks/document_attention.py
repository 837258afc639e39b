"""Cost of document masking: per-document attention (``document_ids``) and the dense per-document mask it
replaced, relative to plain causal attention, for one forward+backward of a whole model.

    python benchmarks/document_attention.py                   # seq 4096, 8 documents per row, 5M-parameter Llama
    python benchmarks/document_attention.py --seq 8192 --docs 16 --rounds 5

Time: the three variants run interleaved round by round (load from other processes falls on all alike); the
median of ``--rounds`` is reported. Peak memory: torch's ``MemTracker`` follows every tensor a step allocates on
the CPU (parameters, activations, gradients, temporaries) and reports the step's peak.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = ("causal", "documents", "dense-mask")


def setup(seq: int, docs: int):
    from collie.data.pretrain import document_ids
    from collie.models import ModelArgs, build_model
    args = ModelArgs(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seq)
    model = build_model(args, device="cpu", seed=0)
    generator = torch.Generator().manual_seed(0)
    cuts = torch.randperm(seq - 1, generator=generator)[:docs - 1].add(1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [seq])]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    tokens = torch.randint(0, args.vocab_size, (1, seq), generator=generator)
    return model, tokens, positions, document_ids(positions)


def step(variant: str, model, tokens, positions, documents) -> None:
    from collie.data.pretrain import document_causal_mask
    inputs = {"causal": {}, "documents": {"position_ids": positions, "document_ids": documents},
              "dense-mask": {"position_ids": positions, "attention_mask": document_causal_mask(positions)}}[variant]
    logits = model(tokens, **inputs)
    torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
    model.zero_grad(set_to_none=True)


def peak_mib(variant: str, state) -> float:
    """The peak of the memory a step holds, as torch's ``MemTracker`` counts it."""
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(state[0])
    with tracker:
        step(variant, *state)
    return sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=8, help="documents per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    state = setup(options.seq, options.docs)
    times = {variant: [] for variant in VARIANTS}
    for round_ in range(options.rounds + 1):  # round 0 warms up
        for variant in VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]:
            start = time.perf_counter()
            step(variant, *state)
            if round_:
                times[variant].append(time.perf_counter() - start)
    memory = {variant: peak_mib(variant, state) for variant in VARIANTS}
    print(f"seq {options.seq}, {options.docs} documents per row, {options.threads} threads, torch {torch.__version__}")
    print(f"{'variant':<12}{'step s':>9}{'× causal':>10}{'peak MiB':>10}{'× causal':>10}")
    base_time, base_memory = statistics.median(times["causal"]), memory["causal"]
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        print(f"{variant:<12}{median:>9.3f}{median / base_time:>10.2f}{memory[variant]:>10.0f}"
              f"{memory[variant] / base_memory:>10.2f}")


if __name__ == "__main__":
    main()
