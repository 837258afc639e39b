"""Print, per layout, the parity with one process and the per-rank memory of the tiny model (docs/parallelism.md).

    python tests/distributed/report.py            # 2- and 4-rank layouts
    python tests/distributed/report.py 2 4 8      # also dp2×tp2×pp2 on 8 ranks
"""
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from test_layouts import HARNESS, LAUNCHES  # noqa: E402

from collie.distributed import init_parallel  # noqa: E402
from collie.distributed.launch import run_distributed  # noqa: E402


def main(worlds):
    reference = {}
    for name in ("single", "single_tied"):
        reference[name] = harness.train_layout(harness.LAYOUTS[name], init_parallel(harness.parallel_config({}), "cpu"))
    kib = lambda b: f"{b / 1024:.0f}"
    print("| layout | ranks | max loss rel. diff | max weight abs. diff | params KiB/rank | grads KiB/rank | "
          "optimizer KiB/rank | launch s |")
    print("|---|---|---|---|---|---|---|---|")
    mem = reference["single"]["memory"]
    print(f"| single | 1 | 0 | 0 | {kib(mem['param_bytes'])} | {kib(mem['grad_bytes'])} | "
          f"{kib(mem['optimizer_bytes'])} | |")
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            ranks = run_distributed(HARNESS, world, LAUNCHES[world], timeout_s=600, result_dir=out)
            seconds = time.perf_counter() - start
            for name in LAUNCHES[world]:
                results = [r[name] for r in ranks]
                if "error" in results[0]:
                    print(f"| {name} | {world} | ERROR {results[0]['error'][:200]} |")
                    continue
                ref = reference["single_tied" if harness.LAYOUTS[name].get("tie") else "single"]
                loss = max(abs(a - b) / abs(b) for r in results for a, b in zip(r["losses"], ref["losses"]))
                weights = torch.load(results[0]["weights_path"])
                diff = max((weights[k] - v).abs().max().item() for k, v in ref["weights"].items())
                per_rank = {k: max(r["memory"][k] for r in results) for k in results[0]["memory"]}
                print(f"| {name} | {world} | {loss:.1e} | {diff:.1e} | {kib(per_rank['param_bytes'])} | "
                      f"{kib(per_rank['grad_bytes'])} | {kib(per_rank['optimizer_bytes'])} | {seconds:.0f} |")


if __name__ == "__main__":
    main([int(w) for w in sys.argv[1:]] or [2, 4])
