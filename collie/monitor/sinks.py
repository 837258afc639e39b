"""Where metrics go: console, JSONL, CSV, TensorBoard, wandb. Sinks live on rank 0 only."""
from __future__ import annotations

import csv
import json
import logging
import math
import os

from collie.errors import ConfigError

logger = logging.getLogger("collie")


class Sink:
    def write(self, step: int, metrics: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink(Sink):
    """``metrics.jsonl``: one strict-JSON object per logged step, what scripts and comparisons read.

    A resumed run recomputes the steps after its checkpoint: its first row drops the rows of that step and later
    ones (and a line cut short by a crash), so every step appears once. NaN and ±inf are written as the strings
    "NaN", "Infinity", "-Infinity" (strict JSON has no such numbers; ``float(value)`` reads them back)."""

    def __init__(self, output_dir: str, filename: str = "metrics.jsonl"):
        self.path = os.path.join(output_dir, filename)
        self.file = None

    def write(self, step, metrics):
        if self.file is None:
            _drop_rows_from(self.path, step)
            self.file = open(self.path, "a")
        self.file.write(json.dumps(_strict({"step": step, **metrics}), allow_nan=False) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _strict(value):
    """``value`` with non-finite floats as strings, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _drop_rows_from(path: str, step: int, row_step=None, header_lines: int = 0) -> None:
    """Rewrite ``path`` (atomically) without rows of ``step`` or later and without unreadable lines
    (``row_step``: a line's step or None, default JSON lines; the first ``header_lines`` lines are kept)."""
    if not os.path.exists(path):
        return
    row_step = row_step or _row_step
    with open(path) as f:
        lines = f.readlines()
    kept = lines[:header_lines] + [line for line in lines[header_lines:]
                                   if row_step(line) is not None and row_step(line) < step]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    logger.info("%s: dropped %d rows of steps >= %d (recomputed after resuming)", path, len(lines) - len(kept),
                step)


def _row_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _csv_row_step(line: str) -> int | None:
    """The step of a CSV row (its first column), None for a line cut short by a crash."""
    first = line.split(",", 1)[0]
    return int(first) if line.endswith("\n") and first.isdigit() else None


class CsvSink(Sink):
    """``metrics.csv`` (training steps) and ``eval_metrics.csv`` (evaluations); each file takes the columns of
    its first row (keys first seen later are left out). Like ``metrics.jsonl``, a resumed run first drops the
    rows of the steps it recomputes."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.files, self.writers = {}, {}

    def write(self, step, metrics):
        kind = "eval_metrics" if metrics and all(k.startswith("eval/") for k in metrics) else "metrics"
        row = {"step": step, **metrics}
        if kind not in self.writers:
            path = os.path.join(self.output_dir, f"{kind}.csv")
            _drop_rows_from(path, step, _csv_row_step, header_lines=1)
            self.files[kind] = open(path, "a", newline="")
            self.writers[kind] = csv.DictWriter(self.files[kind], fieldnames=list(row), extrasaction="ignore")
            if self.files[kind].tell() == 0:
                self.writers[kind].writeheader()
        self.writers[kind].writerow(row)
        self.files[kind].flush()

    def close(self):
        for file in self.files.values():
            file.close()
        self.files, self.writers = {}, {}


class ConsoleSink(Sink):
    """A compact line per logged step through the ``collie`` logger."""

    KEYS = [("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
            ("tokens_per_s_per_gpu", "{:,.0f} tok/s/dev"), ("mfu", "mfu {:.1%}"), ("peak_mem_gib", "mem {:.2f} GiB"),
            ("step_time_s", "{:.3f} s/step")]

    def write(self, step, metrics):
        parts = [fmt.format(metrics[k]) for k, fmt in self.KEYS if metrics.get(k) is not None]
        extra = [f"{k} {v:.4g}" for k, v in metrics.items()
                 if k.startswith("eval/") and isinstance(v, (int, float))]
        logger.info("step %d | %s", step, " | ".join(parts + extra))


class TensorBoardSink(Sink):
    def __init__(self, output_dir: str):
        writer_cls = _import_extra("torch.utils.tensorboard", "SummaryWriter", "tensorboard")
        self.writer = writer_cls(log_dir=os.path.join(output_dir, "tensorboard"))

    def write(self, step, metrics):
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink(Sink):
    """A wandb run under ``WANDB_DIR`` (default: ``output_dir``); offline unless ``WANDB_MODE`` says otherwise
    (no network by default)."""

    def __init__(self, output_dir: str, project: str, config: dict):
        wandb = _import_extra("wandb", None, "wandb")
        self.run = wandb.init(project=project, dir=os.environ.get("WANDB_DIR", output_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, step, metrics):
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self):
        self.run.finish()


def _import_extra(module: str, attr: str | None, extra: str):
    import importlib
    try:
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod
    except ImportError as error:
        raise ConfigError(f"monitor.sinks: '{extra}' needs the {extra} package ({error}); install it with "
                          f"pip install -e '.[{extra}]' or pip install {extra}") from None


def build_sinks(cfg, output_dir: str) -> list[Sink]:
    factories = {
        "console": lambda: ConsoleSink(),
        "jsonl": lambda: JsonlSink(output_dir),
        "csv": lambda: CsvSink(output_dir),
        "tensorboard": lambda: TensorBoardSink(output_dir),
        "wandb": lambda: WandbSink(output_dir, cfg.monitor.wandb_project, cfg.to_dict()),
    }
    return [factories[name]() for name in cfg.monitor.sinks]
