"""Activation checkpointing applied from outside the model: decoder layers recompute their activations in
backward.

A checkpointed layer keeps its parameter names (checkpoints and parallel plans are unaffected): its class is
swapped for a subclass whose ``forward`` runs under ``torch.utils.checkpoint`` (non-reentrant, which also
supports the double backward of LOMO's gradient-norm pass and composes with FSDP2).
"""
import torch
from torch.utils.checkpoint import checkpoint

from collie.errors import ConfigError

_CHECKPOINTED: dict[type, type] = {}


def checkpointed_class(cls: type) -> type:
    """``cls`` with its forward recomputed in backward (one subclass per class, cached)."""
    if cls not in _CHECKPOINTED:
        def forward(self, *args, **kwargs):
            return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)
        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    return _CHECKPOINTED[cls]


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every: int = 2) -> None:
    """``full``: every decoder layer; ``selective``: every ``every``-th layer; ``none``: nothing."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ConfigError(f"model.activation_checkpointing={mode!r}; choose none, full or selective")
    for index, layer in model.model.layers.items():
        if (mode == "full" or int(index) % every == 0) and type(layer) not in _CHECKPOINTED.values():
            layer.__class__ = checkpointed_class(type(layer))
