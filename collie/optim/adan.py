"""Adan (Xie et al., 2022, "Adaptive Nesterov Momentum Algorithm"). Matches ``adan_pytorch.Adan``, whose
betas follow the paper's convention (m ← (1−β₁)·m + β₁·g, defaults 0.02, 0.08, 0.01) and whose first step
only records g₀ and applies weight decay (the moments start from the second step)."""
from __future__ import annotations

import torch

from collie.optim.foreach import closure_loss, foreach_lists
from collie.optim.registry import register_optimizer

_STATE_KEYS = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")


class Adan(torch.optim.Optimizer):
    """With d = g − g_prev:  m ← (1−β₁)m + β₁g,  v ← (1−β₂)v + β₂d,  n ← (1−β₃)n + β₃(g + (1−β₂)d)²;
    θ ← (θ − lr/(sqrt(n̂) + eps) · (m̂ + (1−β₂)v̂)) / (1 + lr·wd), hats = bias-corrected. Four state tensors."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.02, 0.08, 0.01), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if len(betas) != 3 or not all(0.0 < b <= 1.0 for b in betas):
            raise ValueError(f"Adan needs three betas in (0, 1]; got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _init_state(param, state) -> None:
        state["step"] = 0
        for key in _STATE_KEYS:
            state[key] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for params, grads, moments, states in foreach_lists(self, group, _STATE_KEYS, self._init_state):
                self._update_moments(group, grads, moments, states)
                self._update_params(group, params, moments, states)
                torch._foreach_copy_(moments[3], grads)
        return loss

    @staticmethod
    def _update_moments(group, grads, moments, states) -> None:
        """The moving averages, for parameters past their first step."""
        beta1, beta2, beta3 = group["betas"]
        later = [i for i, s in enumerate(states) if s["step"] > 0]
        if not later:
            return
        g = [grads[i] for i in later]
        m, v, n, prev = ([moment[i] for i in later] for moment in moments)
        torch._foreach_mul_(m, 1.0 - beta1)
        torch._foreach_add_(m, g, alpha=beta1)
        diff = torch._foreach_sub(g, prev)
        torch._foreach_mul_(v, 1.0 - beta2)
        torch._foreach_add_(v, diff, alpha=beta2)
        next_n = torch._foreach_add(g, torch._foreach_mul(diff, 1.0 - beta2))
        torch._foreach_mul_(next_n, next_n)
        torch._foreach_mul_(n, 1.0 - beta3)
        torch._foreach_add_(n, next_n, alpha=beta3)

    @staticmethod
    def _update_params(group, params, moments, states) -> None:
        lr, eps, wd, (beta1, beta2, beta3) = group["lr"], group["eps"], group["weight_decay"], group["betas"]
        for s in states:
            s["step"] += 1
        steps = [s["step"] for s in states]
        correct_m, correct_v, correct_n = ([1.0 / (1.0 - (1.0 - b) ** t) for t in steps] for b in (beta1, beta2, beta3))
        m, v, n, _ = moments
        step_size = torch._foreach_mul(n, correct_n)
        torch._foreach_sqrt_(step_size)
        torch._foreach_add_(step_size, eps)
        torch._foreach_reciprocal_(step_size)
        torch._foreach_mul_(step_size, lr)
        direction = torch._foreach_mul(m, correct_m)
        torch._foreach_add_(direction, torch._foreach_mul(v, [(1.0 - beta2) * c for c in correct_v]))
        torch._foreach_addcmul_(params, step_size, direction, value=-1.0)
        torch._foreach_div_(params, 1.0 + wd * lr)


@register_optimizer("adan")
def adan(params, lr: float, weight_decay: float = 0.0, betas: tuple = (0.02, 0.08, 0.01),
         eps: float = 1e-8) -> Adan:
    """Adan with the paper's beta convention (β close to 0 = long memory)."""
    return Adan(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
