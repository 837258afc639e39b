"""The benchmark's outputs: a CSV, a markdown table and a PNG of tokens/s per GPU and peak memory."""
from __future__ import annotations

import csv
import datetime
import os
import platform

from collie.errors import CollieError

# (row key, markdown header, format)
COLUMNS = [
    ("name", "configuration", "{}"), ("nproc", "ranks", "{}"), ("layout", "layout", "{}"),
    ("optimizer", "optimizer", "{}"), ("peft", "peft", "{}"), ("dtype", "weights", "{}"),
    ("precision", "precision", "{}"),
    ("trainable_params", "trainable params", "{:,}"), ("tokens_per_s_per_gpu", "tokens/s/GPU", "{:,.0f}"),
    ("step_time_s", "step s (median)", "{:.3f}"), ("mfu", "MFU", "{:.1%}"), ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("final_loss", "final loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"), ("status", "status", "{}"),
]
RATIO_COLUMNS = [("name", "configuration", "{}"), ("baseline", "baseline", "{}"),
                 ("tokens_ratio", "tokens/s ÷ baseline", "{:.2f}"), ("memory_ratio", "peak memory ÷ baseline", "{:.2f}")]
CSV_FIELDS = ["name", "nproc", "layout", "optimizer", "peft", "dtype", "precision", "micro_batch_size", "seq_len",
              "params", "trainable_params", "timed_steps", "step_time_s", "tokens_per_s_per_gpu", "mfu",
              "peak_mem_gib", "final_loss", "eval_loss", "status"]


def environment() -> dict:
    """Where the numbers come from: date, device, library versions."""
    import torch
    import transformers
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    return {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def ratios(rows: list[dict], references: dict[str, list[str]]) -> list[dict]:
    """collie ÷ baseline, in tokens/s and in peak memory, for every configuration a baseline is the reference
    of (``references``: baseline name → configuration names); None where either did not run."""
    by_name = {row["name"]: row for row in rows}
    out = []
    for baseline, names in references.items():
        reference = by_name[baseline]
        for name in names:
            row, ok = by_name[name], reference.get("status") == "ok" and by_name[name].get("status") == "ok"
            out.append({"name": name, "baseline": baseline,
                        "tokens_ratio": row["tokens_per_s_per_gpu"] / reference["tokens_per_s_per_gpu"] if ok else None,
                        "memory_ratio": row["peak_mem_gib"] / reference["peak_mem_gib"] if ok else None})
    return out


def render_markdown(rows: list[dict], title: str, env: dict, notes: str = "",
                    references: dict[str, list[str]] | None = None) -> str:
    lines = [f"# {title}", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += _table(COLUMNS, rows)
    if references:
        lines += ["", "collie ÷ baseline, measured in the same `collie bench` run:", ""]
        lines += _table(RATIO_COLUMNS, ratios(rows, references))
    return "\n".join(lines) + "\n"


def _table(columns, rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |" for row in rows]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    return fmt.format(value).replace("|", "/")


def require_matplotlib():
    """matplotlib with a file-only backend, or an error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise CollieError("collie bench: the plot needs matplotlib; install it with pip install -e '.[bench]' "
                          "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: list[dict], path: str, title: str) -> None:
    """Two bar charts side by side: tokens/s per GPU and peak memory per configuration (failed ones omitted)."""
    plt = require_matplotlib()
    done = [r for r in rows if r.get("status") == "ok"]
    names = [r["name"] for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(done) + 1.6), squeeze=False)
    for ax, key, label in zip(axes[0], ("tokens_per_s_per_gpu", "peak_mem_gib"),
                              ("tokens/s per GPU (median)", "peak memory (GiB)")):
        values = [r[key] or 0 for r in done]
        ax.barh(names, values, color="tab:blue" if key.startswith("tokens") else "tab:orange")
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if values:
            label_format = "{:,.0f}" if key.startswith("tokens") else "{:.2f}"
            ax.bar_label(ax.containers[0], fmt=label_format, padding=2, fontsize=8)
        ax.margins(x=0.15)
    axes[0][1].set_yticklabels([])
    failed = [r["name"] for r in rows if r.get("status") != "ok"]
    fig.suptitle(title + (f" (failed, not shown: {', '.join(failed)})" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str, title: str, notes: str = "", with_plot: bool = True,
                 references: dict[str, list[str]] | None = None) -> dict:
    """Write ``results.csv``, ``results.md`` (with the collie ÷ baseline table when ``references`` maps baseline
    rows to the configurations they are the reference of) and ``results.png``; return their paths."""
    paths = {"csv": os.path.join(out_dir, "results.csv"), "markdown": os.path.join(out_dir, "results.md")}
    write_csv(rows, paths["csv"])
    with open(paths["markdown"], "w") as f:
        f.write(render_markdown(rows, title, environment(), notes, references))
    if with_plot:
        paths["png"] = os.path.join(out_dir, "results.png")
        plot(rows, paths["png"], title)
    return paths
