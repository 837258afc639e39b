"""Export the model of a training checkpoint (saved at any layout, by any engine) as a Hugging Face directory."""
from __future__ import annotations

import os

import torch

from collie.checkpoint.store import STATE_FILE, CheckpointManager, load_tensors, read_json
from collie.errors import CheckpointError


def export_to_hf(checkpoint_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """Write the model of a training checkpoint (saved at any layout) as a Hugging Face directory."""
    from collie.models import ModelArgs, build_model
    from collie.schema import from_dict
    state_file = os.path.join(checkpoint_dir, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"{checkpoint_dir} is not a collie checkpoint: {STATE_FILE} is missing")
    CheckpointManager(os.path.dirname(os.path.abspath(checkpoint_dir))).verify(checkpoint_dir)
    saved = read_json(state_file)
    if not isinstance(saved.get("model_args"), dict):
        raise CheckpointError(f"{state_file} has no model_args: not a collie training checkpoint")
    args = from_dict(ModelArgs, saved["model_args"], f"{state_file}: model_args")
    model = build_model(args, device="cpu")
    if saved.get("layout", {}).get("engine") == "deepspeed":
        from collie.distributed.deepspeed_engine import read_deepspeed_weights
        model.load_state_dict(read_deepspeed_weights(checkpoint_dir))
    else:
        tensors = {"model": model.state_dict()}
        load_tensors(tensors, checkpoint_dir, no_dist=True)
        model.load_state_dict(tensors["model"])
    model.save_pretrained(out_dir, dtype=dtype)
