"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``."""
import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based count of finished optimizer steps)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim_cfg.warmup_steps, total_steps,
                                                      optim_cfg.scheduler, optim_cfg.min_lr_ratio))
