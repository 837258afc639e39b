"""LOMO (Lv et al., 2023): SGD fused into backward, no optimizer state. Matches ``lomo_optim.Lomo``."""
from __future__ import annotations

from collie.optim.fused import FusedOptimizer, add_masked_, validate_fused_config
from collie.optim.registry import register_optimizer


class Lomo(FusedOptimizer):
    """``θ ← θ − lr·g − lr·wd·θ``, applied in the gradient hook (fp32 arithmetic, written in θ's dtype)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad_norm: float = 0.0,
                 clip_grad_value: float = 0.0, guard_nonfinite: bool = False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm, clip_grad_value,
                         guard_nonfinite)

    def _update(self, param, grad, group, state, layout, guard) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        delta = grad.mul_(-lr)  # built in the gradient's buffer: no parameter-sized temporary
        if weight_decay:
            delta.add_(param, alpha=-lr * weight_decay)
        add_masked_(param, delta, guard)


@register_optimizer("lomo", validate=validate_fused_config, fused=True)
def lomo(params, lr: float, weight_decay: float = 0.0, clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0,
         guard_nonfinite: bool = False) -> Lomo:
    """LOMO; clip_grad_norm / clip_grad_value come from optim.clip_grad_norm / optim.clip_grad_value."""
    return Lomo(params, lr=lr, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
                clip_grad_value=clip_grad_value, guard_nonfinite=guard_nonfinite)
