"""Export the model of a training checkpoint (saved at any layout, by any engine) as a Hugging Face directory.

The model is rebuilt as it was trained: for a ``peft.method=lora`` run with its LoRA factors, which the export
merges into the base weights (or, with ``adapter=True``, writes as a peft adapter next to its base model).
"""
from __future__ import annotations

import logging
import os

import torch

from collie.checkpoint.store import STATE_FILE, CheckpointManager, load_tensors, read_json
from collie.errors import CheckpointError

logger = logging.getLogger("collie")


def export_to_hf(checkpoint_dir: str, out_dir: str, dtype: torch.dtype | None = None, adapter: bool = False) -> str:
    """Write the model of a training checkpoint (saved at any layout) as a Hugging Face directory: the merged
    model for a LoRA run, or with ``adapter`` its peft adapter in ``out_dir`` and the base model in
    ``out_dir/base_model``. Returns what was written."""
    state_file = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{checkpoint_dir} is not a collie checkpoint: {STATE_FILE} is missing")
    CheckpointManager(os.path.dirname(os.path.abspath(checkpoint_dir))).verify(checkpoint_dir)
    saved = read_json(state_file)
    model, lora = _trained_model(saved, state_file)
    if adapter and not lora:
        raise CheckpointError(f"{checkpoint_dir} is not from a peft.method=lora run, so it has no adapter to write; "
                              f"convert it without --adapter")
    if saved.get("layout", {}).get("engine") == "deepspeed":
        from collie.distributed.deepspeed_engine import read_deepspeed_weights
        model.load_state_dict(read_deepspeed_weights(checkpoint_dir))
    else:
        tensors = {"model": model.state_dict()}
        load_tensors(tensors, checkpoint_dir, no_dist=True)
        model.load_state_dict(tensors["model"])
    written = _save(model, out_dir, dtype, lora, adapter)
    _save_tokenizer(saved, out_dir)
    return written


def _save_tokenizer(saved: dict, out_dir: str) -> None:
    """The run's tokenizer, chat template and generation config next to the exported model, so that the directory
    is complete for ``AutoTokenizer`` and ``collie generate``; a warning when the tokenizer is no longer where the
    run found it (paths resolve against the working directory)."""
    from collie.config import DataConfig
    from collie.data.templates import save_chat_files
    from collie.data.tokenizer import load_tokenizer
    from collie.errors import DataError
    from collie.schema import from_dict
    config = saved.get("config") or {}
    data = from_dict(DataConfig, config.get("data") or {}, "data")
    path = data.tokenizer or (config.get("model") or {}).get("pretrained")
    try:
        tokenizer = load_tokenizer(path)
    except DataError as e:
        logger.warning("exported the model without a tokenizer: %s", e)
        return
    tokenizer.save_pretrained(out_dir)
    save_chat_files(out_dir, data, tokenizer)


def _trained_model(saved: dict, state_file: str):
    """The model the checkpoint was trained as (LoRA factors included) on CPU, and whether it has LoRA."""
    from collie.models import ModelArgs, build_model
    from collie.peft import apply_lora
    from collie.schema import from_dict
    from collie.models.hf_backend import hf_args_from_dict
    if not isinstance(saved.get("model_args"), dict):
        raise CheckpointError(f"{state_file} has no model_args: not a collie training checkpoint")
    where = f"{state_file}: model_args"
    if saved["model_args"].get("backend") == "hf":  # model.backend=hf: the transformers model it describes
        args = hf_args_from_dict(saved["model_args"], where)
    else:
        args = from_dict(ModelArgs, saved["model_args"], where)
    model = build_model(args, device="cpu")
    peft = (saved.get("config") or {}).get("peft") or {}
    method = peft.get("method", "none")
    if method == "lora":
        apply_lora(model, peft["r"], peft["alpha"], peft.get("dropout", 0.0), peft["target_modules"],
                   experts=peft.get("lora_experts", False))
    elif method != "none":
        raise CheckpointError(f"{state_file}: a checkpoint of a peft.method={method} run cannot be exported as a "
                              f"model (its adapter is peft's); the run's final/ directory holds the adapter")
    return model, method == "lora"


def _save(model, out_dir: str, dtype, lora: bool, adapter: bool) -> str:
    from collie.peft import merge_lora, save_trained
    if adapter:
        if dtype is not None:
            model.to(dtype)
        return save_trained(model, out_dir)
    if lora:
        merge_lora(model)
    model.save_pretrained(out_dir, dtype=dtype)
    return "model with its LoRA adapter merged" if lora else "model"
