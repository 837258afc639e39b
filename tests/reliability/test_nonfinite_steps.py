"""Non-finite loss or gradients: the step is reported and skipped with weights AND optimizer state unchanged bit for
bit (or the run stops, per train.on_nonfinite) — also for LOMO/AdaLomo, which update inside backward.

The hard case for the fused optimizers is a finite loss whose NaN shows up only in the gradient of the parameter
that backward reaches last (the embedding), after every other parameter's hook has run. By default LOMO/AdaLomo run
ONE backward per step and guard each parameter on its own: the weights stay finite, the step is counted as skipped
and logged as partial, but parameters updated before the NaN keep their update. ``optim.args.guard_nonfinite=true``
buys all-or-nothing steps with a norm-only backward first (collie/optim/fused.py). A non-finite loss, and any
step with gradient accumulation, are all-or-nothing without it.
"""
import copy

import pytest
import torch

from collie.config import CollieConfig
from collie.trainer import Callback, NonFiniteLossError, Trainer
from reliability_helpers import QUICKSTART, overrides

POISON_STEP = 2


class Poison(Callback):
    """At one step: an infinite loss (logits × inf) or a NaN in the embedding's gradient only."""

    def __init__(self, kind: str, step: int = POISON_STEP):
        self.kind, self.step, self.handle = kind, step, None

    def on_step_begin(self, trainer):
        if trainer.state.step + 1 != self.step:
            return
        model = trainer.model_parts[0]
        if self.kind == "loss":
            self.handle = model.lm_head.register_forward_hook(lambda m, i, out: out * float("inf"))
        else:  # runs on the gradient before it reaches .grad, so the fused hook sees the NaN
            self.handle = model.model.embed_tokens.weight.register_hook(lambda g: g * float("nan"))

    def on_step_end(self, trainer, metrics):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Snapshots(Callback):
    """Weights, optimizer state (tensors and scalars) and param_groups after every step."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, trainer, metrics):
        opt = trainer.optimizer
        state = {i: copy.deepcopy(opt.state[p]) for i, p in enumerate(trainer.model.parameters()) if p in opt.state}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.at[trainer.state.step] = ({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                                       state, copy.deepcopy(groups), metrics)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a, b) -> bool:
    """Equal bit for bit (NaN == NaN, -0.0 != 0.0), through dicts, lists and scalars."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(raw_bytes(a), raw_bytes(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b


def train(tmp_path, kind, *extra):
    cfg = CollieConfig.load(QUICKSTART, overrides(tmp_path, "train.max_steps=3", "optim.clip_grad_norm=0",
                                                  "optim.args={}", "data.eval_files=[]", *extra))
    snapshots = Snapshots()
    trainer = Trainer(cfg, callbacks=[Poison(kind), snapshots])
    trainer.fit()
    return trainer, snapshots.at


ALL_OR_NOTHING = "optim.args={guard_nonfinite: true}"
# (optimizer, micro-batches per step, fault, extra overrides): the fused optimizers' single-micro-batch steps need
# the explicit all-or-nothing option for a late NaN; a NaN loss and accumulated steps are all-or-nothing by default
CASES = [("adamw", 1, "loss", ()), ("adamw", 1, "late_grad", ()), ("lomo", 1, "late_grad", (ALL_OR_NOTHING,)),
         ("adalomo", 1, "late_grad", (ALL_OR_NOTHING,)), ("adalomo", 2, "late_grad", ()), ("adalomo", 2, "loss", ()),
         ("lomo", 1, "loss", ())]


@pytest.mark.parametrize("optimizer, accum, kind, options", CASES)
def test_nonfinite_step_is_skipped_bit_for_bit(tmp_path, optimizer, accum, kind, options):
    extra = [f"optim.name={optimizer}", f"train.grad_accum_steps={accum}", f"train.micro_batch_size={8 // accum}",
             *options]
    trainer, at = train(tmp_path, kind, *extra)
    log = (tmp_path / "train.log").read_text()
    before, after, later = at[POISON_STEP - 1], at[POISON_STEP], at[POISON_STEP + 1]
    assert trainer.state.skipped_steps == 1 and after[3]["skipped_steps"] == 1
    assert bitwise_equal(before[0], after[0]), "weights changed in the skipped step"
    assert bitwise_equal(before[1], after[1]), "optimizer state changed in the skipped step"
    assert bitwise_equal(before[2], after[2]), "param_groups (lr) changed in the skipped step"
    assert not bitwise_equal(after[0], later[0]), "training did not continue after the skipped step"
    assert f"step {POISON_STEP}: non-finite" in log and "after some parameters were updated" not in log
    assert all(torch.isfinite(v).all() for v in later[0].values())


@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_by_default_a_late_nan_leaves_finite_weights_and_a_counted_partial_step(tmp_path, optimizer):
    """The default (one backward per step) shows the fault above is the hard case: other parameters were
    already updated. The NaN parameter and its state are untouched, no weight becomes non-finite, and the step
    is counted as skipped and logged as partial."""
    trainer, at = train(tmp_path, "late_grad", f"optim.name={optimizer}")
    log = (tmp_path / "train.log").read_text()
    before, after, later = at[POISON_STEP - 1], at[POISON_STEP], at[POISON_STEP + 1]
    assert bitwise_equal(before[0]["model.embed_tokens.weight"], after[0]["model.embed_tokens.weight"])
    assert not bitwise_equal(before[0]["lm_head.weight"], after[0]["lm_head.weight"])
    assert all(torch.isfinite(v).all() for snapshot in (after, later) for v in snapshot[0].values())
    assert all(torch.isfinite(v).all() for state in after[1].values() for v in state.values() if torch.is_tensor(v))
    assert trainer.state.skipped_steps == 1 and after[3]["skipped_steps"] == 1
    assert "after some parameters were updated" in log and f"step {POISON_STEP}: non-finite" in log
    assert not bitwise_equal(after[0], later[0]), "training did not continue after the partial step"


class BackwardCounter(Callback):
    """How many times each parameter's gradient was completed in each step: the number of backward passes
    (the counting hook is registered after the optimizer's, so it runs whether or not that one updates)."""

    def __init__(self):
        self.per_step, self.calls, self.params = [], 0, None

    def on_step_begin(self, trainer):
        if self.params is None:
            self.params = [p for p in trainer.model.parameters() if p.requires_grad]
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._count)
        self.calls = 0

    def _count(self, param):
        self.calls += 1

    def on_step_end(self, trainer, metrics):
        self.per_step.append(self.calls / len(self.params))


@pytest.mark.parametrize("optimizer, extra, passes", [
    ("lomo", (), 1), ("adalomo", (), 1), ("adalomo", ("optim.clip_grad_value=0.5",), 1),
    ("lomo", ("optim.clip_grad_norm=1.0",), 2), ("lomo", (ALL_OR_NOTHING,), 2),
    ("adalomo", ("train.grad_accum_steps=2", "train.micro_batch_size=4"), 2)])  # 2 micro-batches, 1 backward each
def test_fused_optimizers_run_one_backward_per_step_by_default(tmp_path, optimizer, extra, passes):
    cfg = CollieConfig.load(QUICKSTART, overrides(tmp_path, "train.max_steps=2", "optim.clip_grad_norm=0",
                                                  "optim.args={}", "data.eval_files=[]", f"optim.name={optimizer}",
                                                  *extra))
    counter = BackwardCounter()
    Trainer(cfg, callbacks=[counter]).fit()
    assert counter.per_step == [passes, passes]


@pytest.mark.parametrize("optimizer", ["adamw", "adalomo"])
def test_nonfinite_gradients_can_stop_the_run(tmp_path, optimizer):
    with pytest.raises(NonFiniteLossError, match=f"step {POISON_STEP}: .*train.on_nonfinite=stop"):
        train(tmp_path, "late_grad", f"optim.name={optimizer}", "train.on_nonfinite=stop")
