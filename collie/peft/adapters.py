"""Prefix tuning, prompt tuning and IA3 through the Hugging Face ``peft`` package.

These methods change the attention inputs (prefix/prompt) or need peft's own layers (IA3), so collie runs them
on a ``transformers`` copy of its model: ``apply_hf_peft`` converts the collie model (Hugging Face directory
round trip), wraps it with ``peft.get_peft_model`` and returns a ``PeftCausalLM`` that the Trainer calls like a
collie model (``forward(input_ids, position_ids, attention_mask) -> logits``). They run in one process;
``PeftCausalLM.save_pretrained`` writes a standard peft adapter directory.
"""
from __future__ import annotations

import tempfile

import torch
from torch import nn

from collie.errors import ConfigError

HF_PEFT_METHODS = ("prefix", "prompt", "ia3")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class PeftCausalLM(nn.Module):
    """A ``peft.PeftModel`` with collie's model interface: logits for the real tokens only."""

    def __init__(self, peft_model, args, method: str):
        super().__init__()
        self.peft_model = peft_model
        self.args = args
        self.method = method

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab). Prefix and prompt tuning place the real tokens after the virtual ones
        as peft does, so ``position_ids`` are used by IA3 only."""
        kwargs = {"position_ids": position_ids} if self.method == "ia3" else {}
        logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return logits[:, -input_ids.shape[1]:]  # prompt tuning returns the virtual positions first

    def save_pretrained(self, path, base_model_dir=None) -> None:
        """Write the adapter as a peft directory (adapter_config.json + adapter_model.safetensors) whose
        ``base_model_name_or_path`` is ``base_model_dir``."""
        self.peft_model.peft_config["default"].base_model_name_or_path = None if base_model_dir is None \
            else str(base_model_dir)
        self.peft_model.save_pretrained(str(path))


def to_transformers(model: nn.Module):
    """The ``transformers`` causal LM with ``model``'s architecture and weights (a Hugging Face directory round
    trip through a temporary directory), in the model's dtype; for ``model.backend: hf`` the model it wraps."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from collie.models.hf_backend import HFCausalLM
    if isinstance(model, HFCausalLM):  # model.backend=hf: already one
        return model.transformers_model
    if type(model).hf_model_type not in CONFIG_MAPPING:
        raise ConfigError(f"peft methods {', '.join(HF_PEFT_METHODS)} run on a transformers model, and transformers "
                          f"has no {type(model).hf_model_type!r} architecture; use peft.method=lora")
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="collie-to-hf-") as tmp:
        model.save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)


def apply_hf_peft(model: nn.Module, method: str, num_virtual_tokens: int = 20,
                  target_modules=("k_proj", "v_proj", "down_proj"), seed: int = 0) -> PeftCausalLM:
    """``model`` (a collie causal LM) converted to ``transformers`` and wrapped by peft for ``method`` (prefix,
    prompt or ia3); only the adapter's parameters require grad. The adapter is initialised from ``seed``."""
    import peft
    config = _peft_config(method, num_virtual_tokens, list(target_modules))
    hf_model = to_transformers(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(hf_model, config)
    return PeftCausalLM(peft_model, model.args, method)


def _peft_config(method: str, num_virtual_tokens: int, target_modules: list[str]):
    import peft
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=target_modules,
                              feedforward_modules=[m for m in target_modules if m in MLP_LINEARS])
    raise ValueError(f"method={method!r}: the peft-backed methods are {', '.join(HF_PEFT_METHODS)}")
