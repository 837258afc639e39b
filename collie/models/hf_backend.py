"""``model.backend: hf``: any local ``transformers`` causal LM, trained by collie as it trains its own models.

``HFCausalLM`` wraps an ``AutoModelForCausalLM`` so that it offers what the engine, the Trainer and the parallel
plans use of a collie model, and nothing more::

    model = HFCausalLM.from_pretrained("path/to/gpt2-like", dtype=torch.float32)
    logits = model(input_ids, position_ids=positions, attention_mask=mask)
    model.args                 # HFModelArgs: vocab and layer sizes for data checks and FLOPs, the config.json
    decoder_layers(model)      # index -> layer, for ZeRO sharding, activation checkpointing and torch.compile

The wrapper holds the transformers model's children as its own, so parameter names are the Hugging Face ones
(``transformer.h.0.attn.c_attn.weight``): checkpoints, LoRA adapters and exports need no renaming, and
``save_pretrained`` writes a directory that ``transformers`` loads as it was. Remote code is never run
(``trust_remote_code=False``); there is no tensor or pipeline parallel plan for an arbitrary architecture, so the
backend runs data parallel and ZeRO 0–3 only (``collie.layout_rules.check_hf_backend``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from collie.errors import ConfigError

logger = logging.getLogger("collie")


@dataclass
class HFModelArgs:
    """What collie reads of a ``transformers`` model's configuration (saved with each checkpoint)."""
    architecture: str = ""  # the transformers class, e.g. GPT2LMHeadModel
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    max_position_embeddings: int = 2**31 - 1
    tie_word_embeddings: bool = False
    config: dict = field(default_factory=dict)
    backend: str = "hf"
    pretrained: Optional[str] = None


def hf_model_args(path: str) -> HFModelArgs:
    """The description of the model in directory ``path`` (its ``config.json``); ConfigError when transformers
    cannot build it without remote code."""
    from collie.models.hf_io import read_hf_config
    raw = read_hf_config(path)
    config = _transformers_config(raw, path)
    return _args_from_config(config, path)


def _transformers_config(raw: dict, where: str):
    """A ``transformers`` configuration object for ``raw`` (a config.json dict) with the causal-LM class it
    builds, refusing configurations that only remote code defines."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        remote = " (its config.json points to custom code with auto_map)" if raw.get("auto_map") else ""
        raise ConfigError(f"{where}: model_type {model_type!r} is not an architecture of the installed transformers"
                          f"{remote}; model.backend=hf runs transformers' own implementations only "
                          f"(trust_remote_code=False): use a model whose model_type transformers defines")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: transformers has no causal language model for model_type {model_type!r}; "
                          f"model.backend=hf trains AutoModelForCausalLM architectures")
    config = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    return config


def _args_from_config(config, pretrained: Optional[str]) -> HFModelArgs:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    hf_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    return HFModelArgs(
        architecture=hf_class, vocab_size=int(text.vocab_size), hidden_size=int(hidden or 0),
        num_hidden_layers=int(_first(text, "num_hidden_layers", "n_layer", "num_layers") or 0),
        num_attention_heads=int(_first(text, "num_attention_heads", "n_head") or 0),
        max_position_embeddings=int(_first(text, "max_position_embeddings", "n_positions") or 2**31 - 1),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        config=config.to_dict(), pretrained=None if pretrained is None else str(pretrained))


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind collie's model interface: ``forward(input_ids, position_ids=,
    attention_mask=) -> logits``, ``args``, ``save_pretrained``. Its children are the transformers model's, so
    parameter names are the Hugging Face ones."""

    def __init__(self, args: HFModelArgs, transformers_model: nn.Module | None = None):
        super().__init__()
        self.args = args
        if transformers_model is None:  # an empty model of this architecture (on the current default device)
            import transformers
            config = _transformers_config(args.config, args.pretrained or "model_args.config")
            transformers_model = transformers.AutoModelForCausalLM.from_config(config)
        own = [*transformers_model._parameters, *transformers_model._buffers]
        if own:
            raise ConfigError(f"{type(transformers_model).__name__} keeps tensors on its top module ({own[0]}), "
                              f"which model.backend=hf cannot shard; use a model with model.backend=collie")
        object.__setattr__(self, "transformers_model", transformers_model)  # not a child: no name prefix
        for name, child in transformers_model.named_children():
            self.add_module(name, child)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device=None) -> "HFCausalLM":
        """The model in directory ``path`` with its weights, in ``dtype`` (on CPU unless ``device``)."""
        import transformers
        args = hf_model_args(path)
        config = _transformers_config(args.config, path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                                  trust_remote_code=False)
        model = cls(args, model)
        return model if device is None else model.to(device)

    @classmethod
    def build(cls, args: HFModelArgs, device="meta", seed: int | None = None) -> "HFCausalLM":
        """An empty model of ``args`` on ``device`` (meta: no memory), randomly initialised by transformers
        from ``seed`` elsewhere."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device(device):
                return cls(args)

    # --- collie's model interface ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits (batch, seq, vocab). ``document_ids`` (per-document attention) is refused at config load."""
        if document_ids is not None:
            raise ConfigError("data.document_masking=true is not supported with model.backend=hf")
        output = self.transformers_model(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=position_ids, use_cache=False)
        return output.logits

    def train(self, mode: bool = True):
        super().train(mode)
        self.transformers_model.training = mode  # the top module is not a child
        return self

    def decoder_layers(self) -> dict[str, nn.Module]:
        """Index → decoder layer: the outermost modules of the classes transformers names in
        ``_no_split_modules`` (what its FSDP auto-wrap and device maps treat as one block)."""
        names = set(getattr(self.transformers_model, "_no_split_modules", None) or ())
        layers, inside = [], set()
        for name, module in self.named_modules():
            if any(name.startswith(prefix) for prefix in inside):
                continue
            if any(cls.__name__ in names for cls in type(module).__mro__):
                layers.append(module)
                inside.add(name + ".")
        if not layers:
            raise ConfigError(f"{self.args.architecture}: transformers names no decoder layer class "
                              f"(_no_split_modules); ZeRO sharding, activation checkpointing and train.compile "
                              f"need one; run it in one process with model.activation_checkpointing=none")
        return {str(i): layer for i, layer in enumerate(layers)}

    # --- Hugging Face I/O ------------------------------------------------------------------------------------
    hf_architecture = property(lambda self: self.args.architecture)

    @staticmethod
    def hf_source(name: str, args=None):
        """The Hugging Face name of parameter ``name``: itself (no conversion)."""
        return name, None

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """Write a Hugging Face directory (config.json + safetensors) that ``transformers`` loads. Tied weights
        are re-tied first (a state dict loaded with ``assign=True`` unties them)."""
        model = self.transformers_model
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        state = None if dtype is None else {k: v.to(dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(str(path), state_dict=state)


def decoder_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Index → decoder layer of ``model``: collie's decoders keep them in ``model.model.layers``; a model that
    keeps them elsewhere (``HFCausalLM``) says where with a ``decoder_layers()`` method."""
    if hasattr(type(model), "decoder_layers"):
        return model.decoder_layers()
    return dict(model.model.layers.items())


def is_hf_backend(args) -> bool:
    return isinstance(args, HFModelArgs)


def hf_args_from_dict(data: dict, where: str) -> HFModelArgs:
    from collie.schema import from_dict
    fields = {f.name for f in dataclasses.fields(HFModelArgs)}
    return from_dict(HFModelArgs, {k: v for k, v in data.items() if k in fields}, where)
