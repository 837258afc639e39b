"""Architectures by name: ``@register_model("name")`` on a model class makes cards, configs and Hugging Face
checkpoints able to build it.

    @register_model("my-llama")
    class MyLlama(LlamaForCausalLM):
        hf_architecture, hf_model_type = "MyLlamaForCausalLM", "my_llama"

A registered class takes a ``ModelArgs`` and, to load and save Hugging Face directories, provides the
class attributes and methods of ``LlamaForCausalLM`` (``hf_architecture``, ``hf_model_type``,
``args_from_hf``, ``hf_config``, ``hf_source``, ``hf_state_dict``).
"""
from __future__ import annotations

import torch

from collie.errors import CheckpointError, ConfigError
from collie.schema import suggest

_MODELS: dict[str, type] = {}


def register_model(name: str):
    """Class decorator registering a model class under ``name`` (the ``architecture`` of its ModelArgs)."""
    def decorate(cls):
        cls.architecture = name
        _MODELS[name] = cls
        return cls
    return decorate


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_model_class(name: str) -> type:
    """The class registered as ``name``; ConfigError naming the registered ones otherwise."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model architecture '{name}'{suggest(name, _MODELS)}; registered: "
                          f"{', '.join(list_models())} (register more with @register_model)")
    return _MODELS[name]


def model_class_for_hf(config: dict, source: str = "config.json") -> type:
    """The registered class for a Hugging Face config: by ``architectures[0]``, else by ``model_type``."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    for cls in _MODELS.values():
        if architectures and getattr(cls, "hf_architecture", None) == architectures[0]:
            return cls
    for cls in _MODELS.values():
        if model_type is not None and getattr(cls, "hf_model_type", None) == model_type:
            return cls
    supported = ", ".join(f"{getattr(c, 'hf_architecture', '?')} ({getattr(c, 'hf_model_type', '?')})"
                          for c in _MODELS.values())
    found = architectures[0] if architectures else None
    raise CheckpointError(f"{source}: architecture {found!r} (model_type {model_type!r}) is not supported; "
                          f"supported: {supported}")


def build_model(args, device: str | torch.device = "meta", seed: int | None = None):
    """The model of ``args.architecture``, created on the meta device (no memory).

    On any other ``device`` its storage is allocated there and ``init_weights(seed)`` fills it. ``HFModelArgs``
    (``model.backend: hf``) build the ``transformers`` model they describe."""
    from collie.models.hf_backend import HFCausalLM, is_hf_backend
    if is_hf_backend(args):
        return HFCausalLM.build(args, device, seed)
    with torch.device("meta"):
        model = get_model_class(args.architecture)(args)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    return model
