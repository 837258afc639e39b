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


MODES = ("none", "full", "selective", "attention")


def apply_activation_checkpointing(model: torch.nn.Module, mode: str, every: int = 2) -> None:
    """``full``: every decoder layer; ``selective``: every ``every``-th layer; ``attention``: the attention
    block of every layer (q/k/v, scores and output recomputed; the MLP keeps its activations); ``none``."""
    if mode not in MODES:
        raise ConfigError(f"model.activation_checkpointing={mode!r}; choose {', '.join(MODES)}")
    if mode == "none":
        return
    from collie.models.hf_backend import decoder_layers
    for index, layer in decoder_layers(model).items():
        if mode == "attention":
            _checkpoint(layer.self_attn)
        elif mode == "full" or (mode == "selective" and int(index) % every == 0):
            _checkpoint(layer)


def _checkpoint(module: torch.nn.Module) -> None:
    if type(module) not in _CHECKPOINTED.values():
        module.__class__ = checkpointed_class(type(module))
