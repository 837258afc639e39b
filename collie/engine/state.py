"""An engine's model and optimizer state keyed by parameter name, so that it follows each parameter to another
dp/tp/pp layout: DCP reshards DTensor shards by name and each pipeline stage reads only the names it holds. Only
tensors go through DCP (whose loader would unpickle anything else); the rest is JSON."""
from __future__ import annotations

import torch


def model_state(parts) -> dict:
    """Parameters (and persistent buffers) of all model parts on this rank, by fully qualified name."""
    state = {}
    for part in parts:
        state.update(part.state_dict())
    return state


def load_model_state(parts, state: dict) -> None:
    """Copy ``state`` (loaded in place by DCP) into the parts; this also re-ties shared weights."""
    for part in parts:
        names = part.state_dict().keys()
        part.load_state_dict({k: v for k, v in state.items() if k in names})


def _param_names(parts) -> dict:
    return {param: name for part in parts for name, param in part.named_parameters()}


def init_optimizer_state(optimizer) -> None:
    """Create the optimizer's lazily-built state (so that it can be loaded into) without changing weights."""
    if any(optimizer.state.values()) or getattr(optimizer, "fused_backward", False):
        return
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    _init_optim_state(optimizer)


def optimizer_state(parts, optimizer) -> tuple[dict, dict]:
    """The optimizer's tensors keyed by parameter name, and its other settings as JSON-able data. On ZeRO-1 a
    rank holds state only for the parameters it owns, which DCP stores once."""
    names = _param_names(parts)
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        if param in names:
            tensors[names[param]] = {k: v for k, v in state.items() if torch.is_tensor(v)}
            scalars[names[param]] = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_extras(parts, optimizer, extras: dict) -> None:
    """Restore what ``optimizer_state`` put in JSON (the tensors were loaded in place by DCP)."""
    names = _param_names(parts)
    for param, state in optimizer.state.items():
        state.update(extras["scalars"].get(names.get(param), {}))
    for group, saved in zip(optimizer.param_groups, extras["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
