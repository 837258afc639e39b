"""LoRA adapters in the Hugging Face peft format, and merging them into the base weights.

A saved adapter is a directory that ``peft.PeftModel.from_pretrained(transformers_model, directory)`` loads:
``adapter_config.json`` (peft's ``LoraConfig``) and ``adapter_model.safetensors`` with peft's key names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Module names are mapped to the
architecture's Hugging Face names with the model class's ``hf_source`` (identity for Llama, Mistral, Qwen2, Qwen3).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from collie.errors import CheckpointError
from collie.models import from_pretrained, save_pretrained
from collie.models.hf_io import atomic_directory
from collie.peft.lora import apply_lora, lora_parameters, merge_lora, merged_weight

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FACTORS = (".lora_A.weight", ".lora_B.weight")
# adapter_config.json settings collie's LoRA does not implement, with the value it needs
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None}


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model's LoRA factors, by collie name. Under tensor parallel or ZeRO this
    gathers the shards: a collective that every rank of the model's mesh must call."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in lora_parameters(model).items()}


def save_adapter(model, directory, base_model_dir=None, state_dict: dict | None = None) -> None:
    """Write ``model``'s LoRA adapter as a peft directory, atomically. ``state_dict``: full tensors to save
    instead of the model's own (e.g. ``collie.distributed.gather_full_state_dict`` on rank 0, where ``model``
    may be one pipeline stage); only its LoRA entries are used."""
    spec = _lora_spec(model)
    if spec.experts:
        raise CheckpointError("peft.lora_experts=true: the routed experts' LoRA factors have no peft equivalent "
                              "(transformers holds each layer's experts as fused 3-D tensors, gate_up_proj and "
                              "down_proj, so a per-expert adapter on gate_proj/up_proj/down_proj cannot be named "
                              "for peft); save the merged model instead (collie.peft.save_trained does, as does "
                              "collie convert of the run's checkpoint)")
    state = lora_state_dict(model) if state_dict is None else \
        {k: v for k, v in state_dict.items() if k.endswith(_FACTORS)}
    tensors = {_peft_key(model, name): t.detach().cpu().contiguous() for name, t in state.items()}
    targets = sorted({key.rsplit(".", 3)[1] for key in tensors})  # "….q_proj.lora_A.weight" -> "q_proj"
    config = _peft_config(spec, targets, base_model_dir)
    with atomic_directory(directory, replace=(ADAPTER_CONFIG, ADAPTER_WEIGHTS)) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _lora_spec(model):
    if not hasattr(model, "lora_spec"):
        raise CheckpointError("the model has no LoRA adapter to save; apply one with collie.peft.apply_lora")
    return model.lora_spec


def _hf_module(model, name: str) -> str:
    """The Hugging Face name of collie module ``name`` (a linear)."""
    key, transform = type(model).hf_source(f"{name}.weight", model.args)
    if transform is not None:
        raise CheckpointError(f"{name} is packed with other weights in {type(model).hf_architecture} checkpoints "
                              f"({key}), so its LoRA factors have no peft equivalent; merge the adapter "
                              f"(collie.peft.merge_lora) and save the model instead")
    return key.removesuffix(".weight")


def _peft_key(model, name: str) -> str:
    linear, factor = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
    return f"{PEFT_PREFIX}{_hf_module(model, linear)}.{factor}"


def _peft_config(spec, targets: list[str], base_model_dir) -> dict:
    """adapter_config.json content, built by peft's own LoraConfig so every field peft expects is present;
    ``targets`` are Hugging Face module names."""
    import peft
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=alpha, lora_dropout=spec.dropout,
                             target_modules=targets, bias="none",
                             base_model_name_or_path=None if base_model_dir is None else str(base_model_dir))
    return config.to_dict() | {"target_modules": targets}


# --- loading and merging ---------------------------------------------------------------------------------

@torch.no_grad()
def merged_state_dict(state: dict, scale: float) -> dict:
    """``state`` (a LoRA model's full state dict) with every factor pair folded into its base weight
    (W + scale · B·A in fp32, rounded to W's dtype) and the factors dropped: the plain model's state dict. Leaves
    ``state``'s tensors unchanged."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for key in state:
        if key.endswith(".lora_A.weight"):
            linear = key.removesuffix(".lora_A.weight")
            merged[f"{linear}.weight"] = merged_weight(state[f"{linear}.weight"], state[key],
                                                       state[f"{linear}.lora_B.weight"], scale)
    return merged


def load_adapter(model, directory) -> list[str]:
    """Apply the LoRA adapter saved in ``directory`` (peft format, e.g. from ``save_adapter`` or peft's own
    ``save_pretrained``) to ``model`` and load its weights. Returns the adapted linears' names.

    Adapters that peft saved with embedding or ``lm_head`` targets also carry those layers' full base weights
    (``….base_layer.weight``), which are loaded into the model; LoRA on an embedding (``lora_embedding_A/B``),
    which collie's LoRA does not train, is merged into the embedding weight."""
    directory = Path(directory)
    config = _read_adapter_config(directory)
    targets = _collie_targets(model, config["target_modules"])
    embeddings = _embedding_names(model)
    linear_targets = [t for t in targets if t not in embeddings]
    names = apply_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                       target_modules=linear_targets) if linear_targets else []
    _load_factors(model, directory, config["lora_alpha"] / config["r"])
    return names


def _embedding_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}


def _collie_targets(model, hf_targets: list[str]) -> list[str]:
    """Collie names (last components) of Hugging Face target module names; unknown names pass through."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            key, transform = type(model).hf_source(f"{name}.weight", model.args)
            if transform is None:
                names[key.removesuffix(".weight").rsplit(".", 1)[-1]] = name.rsplit(".", 1)[-1]
    return [names.get(t, t) for t in hf_targets]


def _read_adapter_config(directory: Path) -> dict:
    file = directory / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a peft adapter directory must contain {ADAPTER_CONFIG}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file} is not a valid JSON adapter config ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object (peft's LoraConfig), not {type(config).__name__}")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"{directory} holds {ADAPTER_CONFIG} but not the adapter's weights "
                              f"{ADAPTER_WEIGHTS} (found: {', '.join(found)}); copy the whole adapter directory, "
                              f"or save it with peft's safe_serialization=True")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type={config.get('peft_type')!r}; collie loads LORA adapters (load "
                              f"other types with peft.PeftModel.from_pretrained on a transformers model)")
    for key, value in _UNSUPPORTED.items():
        if config.get(key) not in (None, value):
            raise CheckpointError(f"{file}: {key}={config[key]!r} is not supported by collie's LoRA (needs {value!r})")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: not a LoRA adapter config")
    if isinstance(config["target_modules"], str):
        raise CheckpointError(f"{file}: target_modules is a regular expression; collie needs a list of names")
    return config


@torch.no_grad()
def _load_factors(model, directory: Path, scale: float) -> None:
    file = directory / ADAPTER_WEIGHTS
    try:
        tensors = load_file(file)
    except (OSError, ValueError, RuntimeError) as e:  # safetensors' errors for a missing or damaged file
        raise CheckpointError(f"cannot read {file}: {e}") from None
    params = lora_parameters(model)
    expected = {_peft_key(model, name): name for name in params}
    bases = {k: p for k, p in _base_weights(model).items() if k in tensors}
    embedding_factors = _embedding_factors(model, tensors)
    missing = sorted(set(expected) - set(tensors))
    used = set(expected) | set(bases) | {k for pair in embedding_factors.values() for k in pair}
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, param in bases.items():  # layers peft saved whole (embedding / lm_head targets)
        _copy(param, tensors[key], key)
    for weight, (a_key, b_key) in embedding_factors.items():  # W += scale · (B·A)ᵀ, as peft's merge
        delta = (tensors[b_key].float() @ tensors[a_key].float()).T * scale
        _copy(weight, (weight.float() + delta).to(weight.dtype), a_key)
    for key, name in expected.items():
        _copy(params[name], tensors[key], key)


def _copy(param, tensor, key: str) -> None:
    if tensor.shape != param.shape:
        raise CheckpointError(f"{key}: adapter has {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    param.copy_(tensor)


def _base_weights(model) -> dict:
    """peft key → parameter for the whole layers peft saves with embedding / lm_head targets: the base layer's
    weight (``….lm_head.base_layer.weight``; older peft versions: ``….lm_head.weight``)."""
    found = {}
    for name, param in model.named_parameters():
        key, transform = type(model).hf_source(name, model.args)
        if ".lora_" not in name and transform is None and key.endswith(".weight"):
            found[f"{PEFT_PREFIX}{key.removesuffix('.weight')}.base_layer.weight"] = param
            found[f"{PEFT_PREFIX}{key}"] = param
    return found


def _embedding_factors(model, tensors: dict) -> dict:
    """Embedding weight → (peft key of lora_embedding_A, of lora_embedding_B) present in ``tensors``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            key, _ = type(model).hf_source(f"{name}.weight", model.args)
            a_key = f"{PEFT_PREFIX}{key.removesuffix('.weight')}.lora_embedding_A"
            if a_key in tensors and a_key[:-1] + "B" in tensors:
                found[module.weight] = (a_key, a_key[:-1] + "B")
    return found


def load_model_or_adapter(directory, device="cpu"):
    """A collie model from a Hugging Face directory, or from a LoRA adapter directory together with the base
    model its ``adapter_config.json`` names (what the Trainer's final save writes under PEFT)."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        return from_pretrained(directory, device=device)
    base = _read_adapter_config(directory).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a local "
                              f"model directory; merge the adapter with `collie convert --merge BASE ADAPTER OUT`")
    model = from_pretrained(base, device=device)
    load_adapter(model, directory)
    return model


def merge_adapter(base_model_dir, adapter_dir, output_dir, dtype: torch.dtype | None = None) -> None:
    """``collie convert --merge``: base Hugging Face model + peft LoRA adapter → merged Hugging Face model."""
    model = from_pretrained(base_model_dir)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    save_pretrained(model, output_dir, dtype=dtype)
    from collie.data.templates import copy_tokenizer_and_chat_files
    copy_tokenizer_and_chat_files([adapter_dir, base_model_dir], output_dir)
