"""Non-finite loss or gradients: the step is reported and skipped with weights AND optimizer state unchanged bit for
bit (or the run stops, per train.on_nonfinite) — also for LOMO/AdaLomo, which update inside backward.

The hard case for the fused optimizers is a finite loss whose NaN shows up only in the gradient of the parameter
that backward reaches last (the embedding), after every other parameter's hook has run. The Trainer makes those
steps all-or-nothing with the gradient-norm pass (collie/optim/fused.py); ``optim.args.guard_nonfinite=false``
opts out, and then the same fault leaves a partially updated model, which shows the fault is the hard case.
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


CASES = [("adamw", 1, "loss"), ("adamw", 1, "late_grad"), ("lomo", 1, "late_grad"), ("adalomo", 1, "late_grad"),
         ("adalomo", 2, "late_grad"), ("adalomo", 2, "loss"), ("lomo", 1, "loss")]


@pytest.mark.parametrize("optimizer, accum, kind", CASES)
def test_nonfinite_step_is_skipped_bit_for_bit(tmp_path, optimizer, accum, kind):
    extra = [f"optim.name={optimizer}", f"train.grad_accum_steps={accum}", f"train.micro_batch_size={8 // accum}"]
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


@pytest.mark.parametrize("optimizer", ["adalomo"])
def test_without_the_guard_a_late_nan_leaves_a_partial_update(tmp_path, optimizer):
    """The opt-out shows the fault above is the hard case: other parameters were already updated."""
    trainer, at = train(tmp_path, "late_grad", f"optim.name={optimizer}", "optim.args={guard_nonfinite: false}")
    log = (tmp_path / "train.log").read_text()
    before, after = at[POISON_STEP - 1][0], at[POISON_STEP][0]
    assert bitwise_equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not bitwise_equal(before["lm_head.weight"], after["lm_head.weight"])
    assert "after some parameters were updated" in log


@pytest.mark.parametrize("optimizer", ["adamw", "adalomo"])
def test_nonfinite_gradients_can_stop_the_run(tmp_path, optimizer):
    with pytest.raises(NonFiniteLossError, match=f"step {POISON_STEP}: .*train.on_nonfinite=stop"):
        train(tmp_path, "late_grad", f"optim.name={optimizer}", "train.on_nonfinite=stop")
