"""Checkpoints on disk (``store``) and their export to Hugging Face directories (``export``)."""
from collie.checkpoint.export import export_to_hf
from collie.checkpoint.store import STATE_FILE, CheckpointManager, load_tensors, read_json

__all__ = ["STATE_FILE", "CheckpointManager", "export_to_hf", "load_tensors", "read_json"]
