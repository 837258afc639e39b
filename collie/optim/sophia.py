"""SophiaG (Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer"), with the
Gauss-Newton-Bartlett (GNB) estimate of the diagonal Hessian refreshed every ``update_every`` steps.

Training loop contract (a classic optimizer otherwise: backward, clip, ``step()``, scheduler)::

    opt.step(); scheduler.step(); opt.zero_grad()
    if sophia_refresh_due(opt, steps_done):          # steps_done counts optimizer steps, from 1
        refresh_hessian(opt, model, batch, forward_fn)  # forward_fn(batch) -> logits [batch, seq, vocab]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from collie.optim.foreach import closure_loss, foreach_lists
from collie.optim.registry import register_optimizer
from collie.optim.sharded import local_grad, local_tensor


class SophiaG(torch.optim.Optimizer):
    """θ ← θ·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  θ ← θ − lr·clip(m / max(ρ·h, eps), 1).

    ``h`` is the EMA of the GNB estimate B·ĝ⊙ĝ (ĝ: gradient of the mean loss on labels sampled from the
    model, B: number of tokens), updated by ``update_hessian``. Until the first refresh h = 0 and the
    update is sign(m)·lr. The paper's γ is ``rho``; the official code's ``rho·bs·hess`` equals ``rho·h``
    here because B is folded into h. Two state tensors per parameter.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.0, eps: float = 1e-15, update_every: int = 10):
        if rho <= 0 or eps <= 0 or update_every < 1:
            raise ValueError(f"SophiaG needs rho > 0, eps > 0, update_every >= 1; got {rho}, {eps}, {update_every}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps))
        self.update_every = update_every

    @staticmethod
    def _init_state(param, state) -> None:
        state["exp_avg"] = torch.zeros_like(param)
        state["hessian"] = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, wd, (beta1, _), rho, eps = group["lr"], group["weight_decay"], group["betas"], group["rho"], \
                group["eps"]
            for params, grads, (exp_avgs, hessians), _ in foreach_lists(self, group, ("exp_avg", "hessian"),
                                                                        self._init_state):
                torch._foreach_mul_(params, 1.0 - lr * wd)
                torch._foreach_mul_(exp_avgs, beta1)
                torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
                denominators = torch._foreach_mul(hessians, rho)
                torch._foreach_clamp_min_(denominators, eps)
                ratios = torch._foreach_div(exp_avgs, denominators)
                torch._foreach_clamp_min_(ratios, -1.0)
                torch._foreach_clamp_max_(ratios, 1.0)
                torch._foreach_add_(params, ratios, alpha=-lr)
        return loss

    @torch.no_grad()
    def update_hessian(self, num_samples: float) -> None:
        """h ← β₂·h + (1−β₂)·B·g⊙g from the current ``.grad`` (gradients of the sampled-label loss)."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self._init_state(p, self.state[p])
                grad = local_grad(p.grad, p)
                hessian = local_tensor(self.state[p]["hessian"])
                hessian.mul_(beta2).addcmul_(grad, grad, value=(1.0 - beta2) * num_samples)


def sophia_refresh_due(optimizer, steps_done: int) -> bool:
    """Whether the Hessian estimate is refreshed after the ``steps_done``-th optimizer step (k, 2k, …)."""
    return isinstance(optimizer, SophiaG) and steps_done > 0 and steps_done % optimizer.update_every == 0


def refresh_hessian(optimizer: SophiaG, model: torch.nn.Module, batch: dict, forward_fn,
                    generator: torch.Generator | None = None, num_samples: float | None = None) -> None:
    """GNB refresh: sample ŷ ~ softmax(logits) at the positions that carry a label (all positions when the
    batch has no ``labels``), backward the mean cross-entropy on ŷ, update h, and leave every ``.grad`` None.

    ``forward_fn(batch)`` returns logits; call the same (data-parallel wrapped) model as in training so the
    gradients are reduced the same way. ``num_samples`` is B (default: the local number of sampled tokens;
    pass the global count under data parallelism).
    """
    from collie.loss import IGNORE_INDEX, shift_labels  # the loss convention of the training loop
    model.zero_grad(set_to_none=True)
    logits = forward_fn(batch)
    if "labels" in batch:
        logits = logits[shift_labels(batch["labels"]) != IGNORE_INDEX]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    with torch.no_grad():
        sampled = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    F.cross_entropy(logits, sampled).backward()
    optimizer.update_hessian(num_samples if num_samples is not None else sampled.numel())
    model.zero_grad(set_to_none=True)


def validate_sophia_config(cfg) -> None:
    from collie.layout_rules import check_sophia
    check_sophia("sophia", cfg.parallel.pp, cfg.parallel.cp)


@register_optimizer("sophia", validate=validate_sophia_config)
def sophia(params, lr: float, weight_decay: float = 0.0, betas: tuple = (0.965, 0.99), rho: float = 0.04,
           eps: float = 1e-15, update_every: int = 10) -> SophiaG:
    """SophiaG; the Trainer refreshes the Hessian every ``update_every`` steps (see ``refresh_hessian``)."""
    return SophiaG(params, lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                   update_every=update_every)
