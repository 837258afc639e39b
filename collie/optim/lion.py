"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"). Matches ``lion_pytorch.Lion``."""
from __future__ import annotations

import torch

from collie.optim.foreach import closure_loss, foreach_lists
from collie.optim.registry import register_optimizer


class Lion(torch.optim.Optimizer):
    """θ ← θ·(1 − lr·wd) − lr·sign(β₁·m + (1−β₁)·g);  m ← β₂·m + (1−β₂)·g. One state tensor per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Lion needs lr > 0 and betas in [0, 1]; got lr={lr}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @staticmethod
    def _init_state(param, state) -> None:
        state["exp_avg"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for params, grads, (exp_avgs,), _ in foreach_lists(self, group, ("exp_avg",), self._init_state):
                torch._foreach_mul_(params, 1.0 - lr * wd)
                update = torch._foreach_mul(exp_avgs, beta1)
                torch._foreach_add_(update, grads, alpha=1.0 - beta1)
                torch._foreach_sign_(update)
                torch._foreach_add_(params, update, alpha=-lr)
                torch._foreach_mul_(exp_avgs, beta2)
                torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
        return loss


@register_optimizer("lion")
def lion(params, lr: float, weight_decay: float = 0.0, betas: tuple = (0.9, 0.99)) -> Lion:
    """Lion; use a 3-10x smaller lr and a 3-10x larger weight decay than for AdamW."""
    return Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)
