"""Optimizers fused into backward (LOMO, AdaLomo): each parameter is updated as soon as its gradient is
ready and the gradient is freed at once, so the full set of gradients never exists.

Every parameter gets one ``register_post_accumulate_grad_hook`` at construction. The hook takes the gradient
(``p.grad = None``), all-reduces it over the data-parallel group (when one is set), applies value clipping,
then the optimizer's update for that one parameter. Per-gradient work is O(1) in the number of parameters.

Contract with the training loop (classic optimizers keep ``loss.backward(); clip; step()``)::

    opt = build_optimizer(cfg, params)          # opt.fused_backward is True
    opt.setup_training(dp_group=..., grad_reduce="none" under FSDP2 wrappers else "sum",
                       loss_scaler=DynamicLossScaler() if fp16 else None)
    for each step:
        opt.begin_step(num_micro_batches)
        for micro_batch in micro_batches:
            loss = loss_sum / step_token_count  # not scaled by the caller
            opt.backward(loss)                  # instead of loss.backward(); clipping is done inside
        result = opt.step()                     # FusedStepResult(finite, grad_norm, partial)
        if result.finite: scheduler.step()      # LambdaLR over param_groups[*]["lr"] works as usual
        opt.zero_grad()                         # harmless (grads are already None)

What ``backward`` does:

* ``num_micro_batches == 1``: the hooks update during backward — ONE backward per step, the default. Only when
  the global gradient norm is needed before the first update (``needs_grad_norm_pass``: ``clip_grad_norm > 0``,
  a loss scaler, or the opt-in ``guard_nonfinite``) does a first backward with ``retain_graph=True`` only
  accumulate Σ‖g‖² (gradients freed one by one) before the update backward runs with the clip coefficient.
  Cost: one extra backward per step, the graph kept until the second one, and the data-parallel all-reduce
  done twice. AdaLomo normalises each update by its own RMS (``clip_threshold``, the paper's grouped update
  normalisation), so it needs no norm clipping and by default no norm pass.
* ``num_micro_batches > 1``: gradients accumulate in ``.grad`` over all micro-batches (the memory of a full
  gradient is then unavoidable); ``step()`` takes them, computes the norm, checks finiteness and updates.
  The result equals one batch ``num_micro_batches`` times larger, with no extra backward.

Non-finite steps. A step whose loss or gradients turn out non-finite should leave weights and optimizer state
unchanged, yet here a parameter is updated as soon as its own gradient exists, possibly before a later
parameter's gradient turns out non-finite. Three guards, in order of cost:

1. ``backward`` checks the loss before any backward (one sync over dp): a non-finite loss skips the step,
   all-or-nothing, always.
2. When the global gradient norm is known before any update (the norm pass, or accumulation), a non-finite
   norm skips the whole step: all-or-nothing.
3. Otherwise (the default of a single-micro-batch step without norm clipping or fp16) each gradient is checked
   on arrival (no sync) and a non-finite one leaves its parameter and state unchanged, so weights never become
   non-finite; but parameters updated earlier in the same backward keep their update: ``step()`` then reports
   ``finite=False, partial=True`` and the Trainer counts the step as skipped and logs it as partial.

A rollback of case 3 would need a copy of every weight and its state (the memory LOMO exists to save), and
deferring the updates would need every gradient (the same). So all-or-nothing in case 3 is bought with the
norm pass: ``guard_nonfinite=True`` (``optim.args.guard_nonfinite=true``) runs it also when neither clipping
nor fp16 needs it, at the cost of one extra backward per single-micro-batch step (about 1.7× the step time on CPU).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from collie.optim.sharded import SquareSumAccumulator, local_grad, local_sum_of_squares, local_tensor, shard_layout


@dataclass
class FusedStepResult:
    """What ``FusedOptimizer.step()`` reports about the step that just ended."""
    finite: bool  # loss and gradients were finite; False: the step was skipped (or, see partial, cut short)
    grad_norm: float  # global L2 norm after value clipping, before norm clipping; nan when the loss was not finite
    partial: bool = False  # non-finite gradients were met after some parameters had been updated


class DynamicLossScaler:
    """fp16 loss scaling: a step whose gradients overflow is skipped and the scale multiplied by
    ``backoff_factor``; after ``growth_interval`` consecutive finite steps it is multiplied by ``growth_factor``."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0):
        self.loss_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.finite_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    def update(self, found_nonfinite: bool) -> None:
        if found_nonfinite:
            self.loss_scale = max(self.loss_scale * self.backoff_factor, self.min_scale)
            self.finite_steps = 0
            return
        self.finite_steps += 1
        if self.finite_steps == self.growth_interval:
            self.loss_scale *= self.growth_factor
            self.finite_steps = 0

    def state_dict(self) -> dict:
        return {"loss_scale": self.loss_scale, "finite_steps": self.finite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_scale, self.finite_steps = float(state["loss_scale"]), int(state["finite_steps"])


class _Phase(enum.Enum):
    HOLD = "hold"  # leave gradients in .grad (accumulation; step() takes them)
    NORM = "norm"  # accumulate Σ‖g‖² and drop the gradient
    UPDATE = "update"  # update the parameter and drop the gradient


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: the hooks, clipping, accumulation and non-finite handling. Subclasses implement
    ``_init_state(param, group)`` and ``_update(param, grad, group, state, layout, guard)`` on local shards."""

    fused_backward = True

    def __init__(self, params, defaults: dict, clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0,
                 guard_nonfinite: bool = False):
        if clip_grad_norm < 0 or clip_grad_value < 0:
            raise ValueError(f"clip_grad_norm={clip_grad_norm} and clip_grad_value={clip_grad_value} must be >= 0")
        self.clip_grad_norm, self.clip_grad_value, self.guard_nonfinite = clip_grad_norm, clip_grad_value, \
            guard_nonfinite
        self.dp_group, self.grad_reduce, self.loss_scaler = None, "none", None
        self._group_index, self._layouts, self._hooks = {}, {}, []
        self._norm = SquareSumAccumulator()
        super().__init__(params, defaults)  # calls add_param_group, which registers the hooks
        self.begin_step(1)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        for p in group["params"]:
            self._group_index[p] = index
            self._layouts[p] = shard_layout(p)
            self._init_state(p, group)
            # the group is looked up by index at hook time: load_state_dict replaces the group dicts
            self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._on_grad_ready, index)))

    def setup_training(self, dp_group=None, grad_reduce: str = "sum", loss_scaler: DynamicLossScaler | None = None,
                       guard_nonfinite: bool | None = None) -> None:
        """``dp_group``: the data-parallel process group (None in one process). ``grad_reduce``: how the hooks
        all-reduce each gradient over it: "sum" when the loss is already divided by the global token count,
        "avg" otherwise, "none" when FSDP2 ``replicate``/``fully_shard`` reduces before calling the hooks. The
        group is also used to agree on skipping a step. ``loss_scaler``: required for fp16. ``guard_nonfinite``:
        all-or-nothing steps at the cost of a norm pass (see the module docstring); None keeps the
        constructor's choice (False unless ``optim.args.guard_nonfinite=true``)."""
        if grad_reduce not in ("sum", "avg", "none"):
            raise ValueError(f"grad_reduce={grad_reduce!r}; choose sum, avg or none")
        self.dp_group, self.grad_reduce, self.loss_scaler = dp_group, grad_reduce, loss_scaler
        if guard_nonfinite is not None:
            self.guard_nonfinite = guard_nonfinite
        self.begin_step(1)

    def remove_hooks(self) -> None:
        """Detach from the model (before building another optimizer on the same parameters)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # --- one training step ---------------------------------------------------------------------------------
    def begin_step(self, num_micro_batches: int = 1) -> None:
        """Start a step of ``num_micro_batches`` backward calls (``step()`` ends it and resets to 1)."""
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
        self._num_micro_batches = num_micro_batches
        self._phase = _Phase.HOLD if num_micro_batches > 1 else _Phase.UPDATE
        self._norm.reset()
        self._grad_norm = None  # set once the global norm is known, before any update
        self._grad_multiplier = self._inv_scale
        self._loss_nonfinite = self._grads_nonfinite = False

    @property
    def needs_grad_norm_pass(self) -> bool:
        """Whether ``backward`` runs an extra norm-only backward (single micro-batch steps only)."""
        wants_norm = self.clip_grad_norm > 0 or self.loss_scaler is not None or self.guard_nonfinite
        return wants_norm and self._num_micro_batches == 1

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (unscaled) loss; updates the parameters on single-micro-batch steps."""
        if self._loss_nonfinite or self._any_rank_nonfinite(loss):
            self._loss_nonfinite = True
            return
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale_loss(loss)
        if self._phase is _Phase.HOLD:
            loss.backward()
            return
        if self.needs_grad_norm_pass:
            self._phase = _Phase.NORM
            loss.backward(retain_graph=True)
            self._phase = _Phase.UPDATE
            if not self._finish_norm():
                return
        loss.backward()

    @torch.no_grad()
    def step(self, closure=None) -> FusedStepResult:
        """End the step: update from gradients still held (accumulation), report, update the loss scale."""
        if closure is not None:
            raise TypeError("fused optimizers update during backward; step() takes no closure")
        held = [p for p in self._group_index if p.grad is not None]
        if held:
            self._update_held(held)
        result = self._result()
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_nonfinite=not result.finite)
        self.begin_step(1)
        return result

    # --- internals -----------------------------------------------------------------------------------------
    def _any_rank_nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is non-finite on any data-parallel rank (one sync), so all ranks skip together."""
        flag = (~torch.isfinite(loss.detach())).float()
        if self.dp_group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dp_group)
        return bool(flag)

    @property
    def _inv_scale(self) -> float:
        return 1.0 / self.loss_scaler.loss_scale if self.loss_scaler is not None else 1.0

    @torch.no_grad()
    def _on_grad_ready(self, group_index: int, param: torch.Tensor) -> None:
        if self._phase is _Phase.HOLD:
            return
        grad = self._take_grad(param)
        if self._phase is _Phase.NORM:
            self._add_to_norm(param, grad)
            return
        # without a known global norm each gradient is checked on arrival (no sync: a masked update)
        guard = None if self._grad_norm is not None else torch.isfinite(self._add_to_norm(param, grad))
        self._apply(param, grad, self.param_groups[group_index], guard)

    def _take_grad(self, param: torch.Tensor) -> torch.Tensor:
        """Detach the gradient from the parameter: local shard, data-parallel reduced, value-clipped (scaled)."""
        grad = local_grad(param.grad, param)
        param.grad = None
        if self.dp_group is not None and self.grad_reduce != "none":
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.dp_group)  # gloo has no AVG
            if self.grad_reduce == "avg":
                grad.div_(dist.get_world_size(self.dp_group))
        if self.clip_grad_value:
            limit = self.clip_grad_value / self._inv_scale  # the gradient is still multiplied by the loss scale
            grad.clamp_(-limit, limit)
        return grad

    def _add_to_norm(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        sq = local_sum_of_squares(grad) * self._inv_scale ** 2
        # reduced over shards once per step, in _norm.total(); an expert under expert parallelism is held by one
        # rank of its ep group (collie.distributed.expert_parallel tags it), so its square is summed over that too
        expert_group = getattr(param, "expert_parallel_group", None)
        self._norm.add(sq, self._layouts[param], () if expert_group is None else (expert_group,))
        return sq

    def _finish_norm(self) -> bool:
        """Global norm of the gradients seen so far (one sync); sets the clip multiplier. False if non-finite."""
        self._grad_norm = self._norm.total().sqrt()
        if not bool(torch.isfinite(self._grad_norm)):
            self._grads_nonfinite = True
            return False
        if self.clip_grad_norm > 0:
            coef = (self.clip_grad_norm / (self._grad_norm + 1e-6)).clamp(max=1.0)
            self._grad_multiplier = coef * self._inv_scale
        return True

    def _update_held(self, params: list) -> None:
        if self._loss_nonfinite:  # every rank agreed to skip: drop the gradients without reducing them
            for p in params:
                p.grad = None
            return
        grads = [(p, self._take_grad(p)) for p in params]
        for p, grad in grads:
            self._add_to_norm(p, grad)
        if self._finish_norm():
            for p, grad in grads:
                self._apply(p, grad, self.param_groups[self._group_index[p]], guard=None)

    def _apply(self, param: torch.Tensor, grad: torch.Tensor, group: dict, guard) -> None:
        grad = grad.float()  # a copy for low-precision gradients; the taken gradient itself otherwise
        if not (isinstance(self._grad_multiplier, float) and self._grad_multiplier == 1.0):
            grad.mul_(self._grad_multiplier)
        self._update(local_tensor(param), grad, group, self.state[param], self._layouts[param], guard)

    def _result(self) -> FusedStepResult:
        if self._loss_nonfinite:
            return FusedStepResult(finite=False, grad_norm=math.nan)
        if self._grad_norm is not None:
            return FusedStepResult(finite=not self._grads_nonfinite, grad_norm=float(self._grad_norm))
        norm = float(self._norm.total().sqrt())  # updates ran in the hooks, each guarded
        return FusedStepResult(finite=math.isfinite(norm), grad_norm=norm, partial=not math.isfinite(norm))

    # --- state ---------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters and state by parameter index, keeping the state's own dtype (fp32 moments
        of bf16 parameters stay fp32; torch's default would cast them to the parameter dtype)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            self._init_state(param, self.param_groups[self._group_index[param]])
            for key, value in state_dict["state"].get(saved_id, {}).items():
                target = self.state[param][key]
                local_tensor(target).copy_(local_tensor(value) if torch.is_tensor(value) else torch.tensor(value))

    def _init_state(self, param: torch.Tensor, group: dict) -> None:
        """Create the parameter's state eagerly (checkpoint tools expect state to exist before step 1)."""

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, layout, guard) -> None:
        """Update the local ``param`` from the fp32, unscaled, clipped local ``grad`` (which it may overwrite).
        ``guard`` is None or a 0-d bool tensor: when False (non-finite gradient) leave param and state
        unchanged, without a sync."""
        raise NotImplementedError


def add_masked_(target: torch.Tensor, delta: torch.Tensor, guard) -> None:
    """``target += delta`` (in fp32 arithmetic, rounded to target's dtype), unless ``guard`` is False: then
    ``delta`` (possibly non-finite) is zeroed in place first, without a sync and without an allocation. A
    guard on the CPU is read instead (free there), which saves the masking pass over ``delta``."""
    if guard is not None:
        if guard.device.type == "cpu":
            if not bool(guard):
                return
        else:
            delta.masked_fill_(~guard, 0.0)
    target.add_(delta)


def commit_(target: torch.Tensor, new: torch.Tensor, guard) -> None:
    """``target.copy_(new)``, or keep ``target`` where ``guard`` is False (sync-free masked write)."""
    target.copy_(new if guard is None else torch.where(guard, new, target))


def validate_fused_config(cfg) -> None:
    """Combinations a fused optimizer cannot run with, reported at config load (rule: collie.layout_rules)."""
    from collie.layout_rules import check_fused_optimizer
    check_fused_optimizer(cfg.optim.name, cfg.parallel.pp, cfg.parallel.zero_stage, cfg.parallel.engine)
