"""AdaLomo (Lv et al., 2024): LOMO with Adafactor-style factored second moments, update RMS clipping and a
learning rate relative to RMS(θ). Matches ``lomo_optim.AdaLomo`` (without its fixed loss scale)."""
from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor

from collie.optim.fused import FusedOptimizer, add_masked_, commit_, validate_fused_config
from collie.optim.registry import register_optimizer
from collie.optim.sharded import all_reduce_sum_, full_mean, full_rms, full_sum_of_squares, local_tensor, \
    reduced_layout, reduced_placements

logger = logging.getLogger("collie")


class AdaLomo(FusedOptimizer):
    """Per parameter, at step t with β₂ₜ = 1 − t^decay_rate and G = g² + eps[0]:

    * 2-D (and more): row ← β₂ₜ·row + (1−β₂ₜ)·mean_cols(G), col ← β₂ₜ·col + (1−β₂ₜ)·mean_rows(G),
      u = g / sqrt(row/mean(row) ⊗ col); 1-D: v ← β₂ₜ·v + (1−β₂ₜ)·G, u = g / sqrt(v);
    * u ← u / max(1, RMS(u)/clip_threshold);
    * θ ← θ·(1 − lrₜ·wd) − lrₜ·u with lrₜ = lr·max(eps[1], RMS(θ)).

    Moments are fp32; means and RMS are over the full tensor when θ is a sharded DTensor.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, eps=(1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, clip_grad_norm: float = 0.0,
                 clip_grad_value: float = 0.0, guard_nonfinite: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, eps=tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate)
        super().__init__(params, defaults, clip_grad_norm, clip_grad_value, guard_nonfinite)

    def _init_state(self, param, group) -> None:
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(param).device)
        if param.ndim >= 2:
            state["exp_avg_sq_row"] = _zero_moment(param, dim=-1)
            state["exp_avg_sq_col"] = _zero_moment(param, dim=-2)
        else:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)

    def _update(self, param, grad, group, state, layout, guard) -> None:
        step = state["step"] + 1
        beta2t = 1.0 - step.pow(group["decay_rate"])
        new_state = {"step": step}
        if param.ndim >= 2:
            row_mean, col_mean = _grad_sq_means(grad, group["eps"][0], layout)
            new_row = local_tensor(state["exp_avg_sq_row"]) * beta2t + row_mean * (1.0 - beta2t)
            new_col = local_tensor(state["exp_avg_sq_col"]) * beta2t + col_mean * (1.0 - beta2t)
            row_factor, col_factor = _approx_rsqrt_second_moment(new_row, new_col, reduced_layout(layout, -1))
            update = grad.mul_(row_factor).mul_(col_factor)  # in the gradient's buffer: no matrix-sized temporary
            new_state.update(exp_avg_sq_row=new_row, exp_avg_sq_col=new_col)
        else:
            grad_sq = grad.square().add_(group["eps"][0])
            new_v = local_tensor(state["exp_avg_sq"]) * beta2t + grad_sq * (1.0 - beta2t)
            update = new_v.rsqrt().mul_(grad)
            new_state.update(exp_avg_sq=new_v)
        update_sq = full_sum_of_squares(update, layout)
        update_rms = (update_sq / layout.shape.numel()).sqrt()
        lr = group["lr"] * full_rms(param, layout).clamp(min=group["eps"][1])  # a 0-d tensor
        # u / max(1, RMS(u)/clip_threshold) · (−lrₜ) in one pass over the update
        delta = update.mul_(-lr / (update_rms / group["clip_threshold"]).clamp(min=1.0))
        if group["weight_decay"]:
            delta.addcmul_(param, lr, value=-group["weight_decay"])
        if guard is not None:
            guard = guard & torch.isfinite(update_sq)  # update_sq is full-tensor: every shard agrees
        add_masked_(param, delta, guard)
        for key, value in new_state.items():
            commit_(local_tensor(state[key]), value, guard)


def _grad_sq_means(grad, eps: float, layout):
    """Row and column means of g² + eps over the full tensor, from the row and column norms of g: no
    parameter-sized temporary (the update is then built in the gradient's own buffer)."""
    means = []
    for dim in (-1, -2):
        sum_sq = torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32).square_()
        means.append(all_reduce_sum_(sum_sq, layout.dim_groups(dim)).div_(layout.shape[dim]).add_(eps))
    return means


def _approx_rsqrt_second_moment(row, col, row_layout):
    """1/sqrt of the rank-1 estimate row⊗col / mean(row) (as fairseq/transformers Adafactor), as its two
    broadcastable factors (rows × 1, 1 × cols): the outer product is never materialised."""
    row_factor = (row / full_mean(row, -1, row_layout).unsqueeze(-1)).rsqrt_().unsqueeze(-1)
    return row_factor, col.unsqueeze(-2).rsqrt()


def _zero_moment(param, dim: int):
    """fp32 zeros shaped like ``param.sum(dim)``; a DTensor laid out like that sum when param is one."""
    local = local_tensor(param)
    shape = list(local.shape)
    del shape[dim]
    zeros = torch.zeros(shape, dtype=torch.float32, device=local.device)
    if not isinstance(param, DTensor):
        return zeros
    full_shape = list(param.shape)
    del full_shape[dim]
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(zeros, param.device_mesh, reduced_placements(param, dim), run_check=False,
                              shape=torch.Size(full_shape), stride=stride)


@register_optimizer("adalomo", validate=validate_fused_config, fused=True)
def adalomo(params, lr: float, weight_decay: float = 0.0, eps: tuple = (1e-30, 1e-3), clip_threshold: float = 1.0,
            decay_rate: float = -0.8, clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0,
            guard_nonfinite: bool = False) -> AdaLomo:
    """AdaLomo; clip_grad_norm / clip_grad_value come from optim.clip_grad_norm / optim.clip_grad_value."""
    if clip_grad_norm > 0:
        logger.warning("adalomo with optim.clip_grad_norm=%g: each single-micro-batch step runs an extra "
                       "norm-only backward; AdaLomo already normalises every update (clip_threshold), and its "
                       "authors recommend it without gradient-norm clipping: set optim.clip_grad_norm=0 for one "
                       "backward per step", clip_grad_norm)
    return AdaLomo(params, lr=lr, weight_decay=weight_decay, eps=eps, clip_threshold=clip_threshold,
                   decay_rate=decay_rate, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                   guard_nonfinite=guard_nonfinite)
