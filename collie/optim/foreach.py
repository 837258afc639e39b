"""Lists of local shards for ``torch._foreach_*`` updates of elementwise optimizers.

An elementwise update of a sharded DTensor is the same update of each local shard, so classic optimizers
(Lion, Adan, Sophia) run their foreach kernels on local tensors: no communication, and every foreach op is
available (DTensor registers only some of them). State tensors are DTensors laid out like their parameter,
so checkpoints can be resharded.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from collie.optim.sharded import local_grad, local_tensor


def foreach_lists(optimizer: torch.optim.Optimizer, group: dict, state_keys: tuple[str, ...],
                  init_state: Callable[[torch.Tensor, dict], None]) -> Iterator[tuple[list, list, list[list], list]]:
    """For the group's parameters that have a gradient, per (device, dtype): (params, grads, [state lists in
    ``state_keys`` order], per-parameter state dicts), all local shards. State is created on first use."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if not optimizer.state[p]:
            init_state(p, optimizer.state[p])
    states = [optimizer.state[p] for p in params]
    lists = [[local_tensor(p) for p in params], [local_grad(p.grad, p) for p in params]]
    lists += [[local_tensor(s[key]) for s in states] for key in state_keys]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for (tensors, indices) in grouped.values():
        yield tensors[0], tensors[1], tensors[2:], [states[i] for i in indices]


def closure_loss(closure):
    """``closure()`` re-evaluated with gradients enabled (torch's optimizer ``step(closure)`` protocol), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
