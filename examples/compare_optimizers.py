"""The same instruction-tuning job with each optimizer, side by side: loss curves and peak memory.

    python examples/compare_optimizers.py configs/sft_optimizers.yaml [--optimizers adamw lomo] [--nproc N]
        [section.key=value ...]

Each optimizer runs as its own ``collie train`` process (under ``torchrun --nproc_per_node N`` with ``--nproc``),
so peak memory is measured per run; results go to ``train.output_dir/<optimizer>/metrics.jsonl`` and the plot
to ``train.output_dir/comparison.png``. Learning rates differ per optimizer (Lion and Sophia take smaller
steps, the fused LOMO/AdaLomo larger ones); override one with e.g. ``--lr lion=1e-4``.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import collie

DOTTED_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # section.key=value, not --lr name=lr
LEARNING_RATES = {"adamw": 2e-3, "lion": 3e-4, "adan": 2e-3, "sophia": 3e-4, "lomo": 3e-2, "adalomo": 3e-2}


def run(config: str, name: str, lr: float, output_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = [sys.executable, "-m", "collie"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "collie"]
    args = [*overrides, f"optim.name={name}", f"optim.lr={lr}", f"train.output_dir={output_dir / name}"]
    print(f"--- {name} (lr {lr})", flush=True)
    subprocess.run([*launcher, "train", config, *args], check=True)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        steps = [r for r in records if "loss" in r]
        loss_ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=name)
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss", yscale="log")
    loss_ax.legend()
    peaks = [max((r.get("peak_mem_gib", 0.0) for r in records), default=0.0) for records in runs.values()]
    mem_ax.bar(list(runs), peaks)
    mem_ax.set(ylabel="GiB", title="peak memory per rank (process RSS on CPU)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options and dotted overrides in any order: every ``section.key=value`` word is an override, wherever it
    stands (``--optimizers adamw lomo train.max_steps=50`` and ``--nproc 4 parallel.tp=2 --optimizers …``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the job config, e.g. configs/sft_optimizers.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.max_steps=50")
    parser.add_argument("--optimizers", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES),
                        help="the optimizers to compare (default: all)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="NAME=LR", help="learning rate of one optimizer")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    overrides = [word for word in argv if DOTTED_OVERRIDE.match(word)]
    args = parser.parse_args([word for word in argv if not DOTTED_OVERRIDE.match(word)])
    args.overrides = overrides
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rates = {**LEARNING_RATES, **{k: float(v) for k, v in (item.split("=") for item in args.lr)}}
    output_dir = Path(collie.CollieConfig.load(args.config, args.overrides).train.output_dir)
    runs = {}
    for name in args.optimizers:
        run(args.config, name, rates[name], output_dir, args.overrides, args.nproc)
        runs[name] = read_metrics(output_dir / name / "metrics.jsonl")
    print(f"{'optimizer':<10}{'lr':>9}{'final loss':>12}{'peak GiB':>10}{'tokens/s':>10}")
    for name, records in runs.items():
        last = [r for r in records if "loss" in r][-1]
        peak = max(r.get("peak_mem_gib", 0.0) for r in records)
        print(f"{name:<10}{rates[name]:>9.1e}{last['loss']:>12.4f}{peak:>10.3f}{last['tokens_per_s_per_gpu']:>10.0f}")
    plot(runs, output_dir / "comparison.png")
    print(f"plot: {output_dir / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
