"""Monitors: what each step costs and achieves, written to console, JSONL, CSV, TensorBoard and wandb."""
from collie.monitor.monitor import Monitor, ProgressBar

__all__ = ["Monitor", "ProgressBar"]
