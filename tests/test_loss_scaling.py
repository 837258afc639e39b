"""fp16 loss scaling of classic optimizers: a finite step updates at the unscaled gradient, a non-finite one is
skipped and the scale backs off. The back-off follows the global gradient norm, so under sharded gradients every
rank backs off, not only those whose own shard held the inf (one process here: the rule, not the collective)."""
import math

import torch

from collie.config import CollieConfig
from collie.distributed import init_parallel
from collie.engine.updates import ClassicUpdate


def update_of(param):
    cfg = CollieConfig.from_dict({"data": {"train_files": ["data/quickstart/train.jsonl"]}})
    optimizer = torch.optim.SGD([param], lr=0.1)
    return ClassicUpdate(optimizer, cfg, init_parallel(cfg.parallel, "cpu"), fp16=True)


def test_a_finite_step_updates_and_keeps_the_scale():
    param = torch.nn.Parameter(torch.ones(3))
    update = update_of(param)
    scale = update.loss_scale()
    update.backward((param * 2).sum())
    result = update.step(torch.tensor(1.0), [param])
    assert result.finite and math.isclose(result.grad_norm, 2 * math.sqrt(3), rel_tol=1e-6)
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.8))  # unscaled gradient 2, lr 0.1
    assert update.loss_scale() == scale


def test_a_non_finite_step_is_skipped_and_the_scale_backs_off():
    param = torch.nn.Parameter(torch.ones(3))
    update = update_of(param)
    scale = update.loss_scale()
    update.backward((param * float("inf")).sum())
    result = update.step(torch.tensor(float("inf")), [param])
    assert not result.finite
    torch.testing.assert_close(param.detach(), torch.ones(3))
    assert update.loss_scale() == scale * 0.5 and param.grad is None
