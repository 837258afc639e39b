"""How an engine turns a micro-batch's loss into gradients and gradients into new weights — the part that differs
between classic optimizers (backward, then clip and ``step()``) and LOMO/AdaLomo (the update runs inside
backward). DeepSpeed brings its own (``collie.engine.deepspeed``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from collie.distributed import clip_grad_norm_
from collie.optim import DynamicLossScaler

logger = logging.getLogger("collie")


@dataclass
class StepResult:
    """What an optimizer step did: ``finite`` (False: weights and state left as they were), the global gradient
    norm, and ``partial`` (fused optimizers only: some parameters were updated before a non-finite gradient)."""
    finite: bool
    grad_norm: float
    partial: bool = False


class ClassicUpdate:
    """``loss.backward()`` (scaled under fp16), then unscale, clip, ``optimizer.step()`` and ``zero_grad``."""

    def __init__(self, optimizer, cfg, ctx, fp16: bool):
        self.optimizer, self.cfg, self.ctx = optimizer, cfg, ctx
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=fp16)

    def begin(self, num_micro_batches: int) -> None:
        pass

    def loss_scale(self) -> float:
        """What the loss is multiplied by before backward (a pipeline schedule applies it as a divisor)."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, loss: torch.Tensor, params) -> StepResult:
        grad_norm = self._clip(params)
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.scaler.is_enabled():  # every rank backs off: only some ranks' gradient shards may hold the inf
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(finite, float(grad_norm))

    def _clip(self, params) -> torch.Tensor:
        """Unscale, clip by value and by the global norm (as configured); the norm of the full model's gradient
        whatever the sharding."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in params if p.grad is not None]
        if self.cfg.optim.clip_grad_value:
            torch.nn.utils.clip_grad_value_(params, self.cfg.optim.clip_grad_value)
        return clip_grad_norm_(params, self.cfg.optim.clip_grad_norm or math.inf, self.ctx)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


class FusedUpdate:
    """LOMO / AdaLomo: ``optimizer.backward`` updates each parameter as its gradient arrives (see
    ``collie.optim.fused``); FSDP2 and replicate have already reduced the gradient over dp (× cp)."""

    def __init__(self, optimizer, cfg, ctx, fp16: bool):
        self.optimizer = optimizer
        # one backward per step unless the global norm is needed first (LOMO's norm clipping, fp16); the
        # two-pass all-or-nothing guard only with optim.args.guard_nonfinite=true, which the factory received
        optimizer.setup_training(dp_group=ctx.gradient_group, grad_reduce="none",
                                 loss_scaler=DynamicLossScaler() if fp16 else None)

    def begin(self, num_micro_batches: int) -> None:
        self.optimizer.begin_step(num_micro_batches)

    def loss_scale(self) -> float:
        return 1.0  # the optimizer scales inside its own backward

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.backward(loss)

    def step(self, loss: torch.Tensor, params) -> StepResult:
        result = self.optimizer.step()
        if result.partial:
            logger.warning("non-finite gradients after some parameters were updated (enable "
                           "optim.args.guard_nonfinite for all-or-nothing steps)")
        return StepResult(result.finite, float(result.grad_norm), result.partial)

    def state_dict(self) -> dict:
        scaler = self.optimizer.loss_scaler
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.optimizer.loss_scaler is not None:
            self.optimizer.loss_scaler.load_state_dict(state)
