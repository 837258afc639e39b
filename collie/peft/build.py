"""The ``peft`` config section → an adapted model, its config-load checks and how to save the result."""
from __future__ import annotations

import copy
import os

from collie.errors import ConfigError
from collie.models import build_model
from collie.peft.adapters import HF_PEFT_METHODS, PeftCausalLM, apply_hf_peft
from collie.peft.export import merged_state_dict, save_adapter
from collie.peft.lora import LLAMA_LINEARS, apply_lora
from collie.schema import suggest


def apply_peft(model, peft_cfg, seed: int = 0, world_size: int = 1):
    """The model to train for ``peft_cfg`` (a ``PeftConfig``): ``model`` itself (method none; lora, with
    factors added and the rest frozen) or a ``PeftCausalLM`` around a transformers copy (prefix, prompt, ia3,
    which run in one process: ConfigError when ``world_size`` > 1). LoRA works on a meta-device model too:
    apply it before ``collie.distributed.parallelize``."""
    method = peft_cfg.method
    if method == "lora":
        _check_lora_exportable(model, peft_cfg.target_modules)
        apply_lora(model, peft_cfg.r, peft_cfg.alpha, peft_cfg.dropout, peft_cfg.target_modules, seed,
                   peft_cfg.lora_experts)
    elif method in HF_PEFT_METHODS:
        if world_size > 1:
            raise ConfigError(f"{_one_process(method)}; this job has {world_size} processes")
        return apply_hf_peft(model, method, peft_cfg.num_virtual_tokens, peft_cfg.target_modules, seed)
    return model


def save_peft(model, path, base_model_dir=None, state_dict: dict | None = None) -> None:
    """Save what training produced: a peft adapter directory for LoRA and the peft-backed methods (with
    ``base_model_dir`` as ``base_model_name_or_path``), a Hugging Face model directory otherwise. Several
    processes: pass the full ``state_dict`` gathered to rank 0 (LoRA; see ``save_adapter``)."""
    if isinstance(model, PeftCausalLM):
        model.save_pretrained(path, base_model_dir)
    elif hasattr(model, "lora_spec"):
        save_adapter(model, path, base_model_dir, state_dict)
    else:
        model.save_pretrained(path)


def save_trained(model, path, pretrained=None, state_dict: dict | None = None) -> str:
    """The Trainer's final save. Full fine-tuning: a Hugging Face model directory. PEFT: a peft adapter for
    ``pretrained``; when the base was randomly initialised (``pretrained`` is None) its weights exist nowhere
    else, so they are written to ``path/base_model`` and the adapter points there. ``state_dict``: the gathered
    full state (several processes; ``model`` is then a full meta-device model with the same adapters).
    LoRA with ``peft.lora_experts``: the merged model (peft has no form for per-expert factors).
    Returns what was written, for the log."""
    if not (isinstance(model, PeftCausalLM) or hasattr(model, "lora_spec")):
        if state_dict is not None:
            model.load_state_dict(state_dict, assign=True)
        model.save_pretrained(path)
        return "model"
    if getattr(model, "lora_spec", None) is not None and model.lora_spec.experts:
        _save_merged(model, path, state_dict)
        return "model with its LoRA adapter merged (peft cannot represent the routed experts' factors)"
    base = pretrained
    if base is None:
        base = os.path.join(path, "base_model")
        _save_base(model, base, state_dict)
    save_peft(model, path, base, state_dict)
    return f"adapter (base model {base})"


def _save_merged(model, path, state_dict: dict | None) -> None:
    """The adapted model with its factors folded into the base weights, as a Hugging Face model directory (the
    training model is left as it is)."""
    state = state_dict if state_dict is not None else model.state_dict()
    merged = build_model(model.args, device="meta")
    merged.load_state_dict(merged_state_dict(state, model.lora_spec.scale), assign=True)
    merged.save_pretrained(path)


def _save_base(model, path, state_dict: dict | None) -> None:
    if isinstance(model, PeftCausalLM):  # a copy without peft's layers, so the training model stays adapted
        copy.deepcopy(model.peft_model).unload().save_pretrained(path)
        return
    base = build_model(model.args, device="meta")
    state = state_dict if state_dict is not None else model.state_dict()
    base.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k}, assign=True)
    base.save_pretrained(path)


def validate_peft_config(cfg) -> None:
    """Config-load checks of the ``peft`` section against the rest of ``cfg`` (a ``CollieConfig``)."""
    method = cfg.peft.method
    if cfg.peft.lora_experts and method != "lora":
        raise ConfigError(f"peft.lora_experts=true gives routed experts LoRA factors: set peft.method=lora (it is "
                          f"{method}) or peft.lora_experts=false")
    if method in ("lora", "ia3") and cfg.model.backend == "hf" and not cfg.peft.target_modules:
        raise ConfigError("peft.target_modules is empty; name linears of the model (their last name component)")
    elif method in ("lora", "ia3") and cfg.model.backend != "hf":  # a transformers model: checked when built
        _check_target_modules(cfg.peft.target_modules)
    if method in HF_PEFT_METHODS:
        _check_hf_peft_layout(cfg)


def _check_target_modules(targets: list[str]) -> None:
    if not targets:
        raise ConfigError(f"peft.target_modules is empty; name linears from {', '.join(LLAMA_LINEARS)}")
    for i, name in enumerate(targets):
        if name not in LLAMA_LINEARS:
            raise ConfigError(f"peft.target_modules[{i}]={name!r} is not a linear of a Llama-family model"
                              f"{suggest(name, LLAMA_LINEARS)}; choose from {', '.join(LLAMA_LINEARS)}")


def _check_lora_exportable(model, targets: list[str]) -> None:
    """The run's adapter is saved for peft, which names each target by its checkpoint tensor: refuse before
    training a target that the architecture's checkpoints pack with other weights (InternLM2's wqkv, Phi-3's
    qkv_proj and gate_up_proj) rather than fail at the final save."""
    def packed(name: str) -> bool:
        module = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        fqn = f"model.layers.0.{module}.{name}.weight"
        return name != "lm_head" and type(model).hf_source(fqn, model.args)[1] is not None
    refused = [name for name in targets if packed(name)]
    if refused:
        raise ConfigError(f"peft.target_modules: {', '.join(refused)} are packed with other weights in "
                          f"{type(model).hf_architecture} checkpoints, so a LoRA adapter on them cannot be saved "
                          f"for peft; choose from {', '.join(n for n in LLAMA_LINEARS if not packed(n))}")


def _one_process(method: str) -> str:
    return (f"peft.method={method} runs in one process (parallel.dp=1, parallel.tp=1, parallel.pp=1); LoRA "
            f"(peft.method=lora) supports every layout")


def _check_hf_peft_layout(cfg) -> None:
    """prefix/prompt/ia3 train a transformers copy of the model through Hugging Face peft: one process, no
    collie activation checkpointing or document masks; prefix/prompt put every token after the virtual ones,
    so packed samples cannot restart their positions."""
    method, p, d = cfg.peft.method, cfg.parallel, cfg.data
    for key, value in (("dp", p.dp), ("tp", p.tp), ("pp", p.pp)):
        if value > 1:
            raise ConfigError(f"parallel.{key}={value} is not supported: {_one_process(method)}")
    if cfg.model.activation_checkpointing != "none":
        raise ConfigError(f"model.activation_checkpointing={cfg.model.activation_checkpointing} is not supported "
                          f"with peft.method={method} (it trains a transformers copy of the model); set it to none "
                          f"or use peft.method=lora")
    if d.document_masking:
        raise ConfigError(f"data.document_masking=true is not supported with peft.method={method}; set it to "
                          f"false or use peft.method=lora")
    if method in ("prefix", "prompt") and d.pack:
        raise ConfigError(f"data.pack=true is not supported with peft.method={method}: the virtual tokens come "
                          f"before the whole sequence, so packed samples cannot restart their positions; set "
                          f"data.pack=false")
