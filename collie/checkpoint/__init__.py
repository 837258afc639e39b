"""Checkpoints on disk (``store``, checksummed by ``integrity``), their export to Hugging Face directories
(``export``) and the lock that gives each output directory to one run (``lock``)."""
from collie.checkpoint.export import export_to_hf
from collie.checkpoint.lock import OutputDirLock, claim_output_dir
from collie.checkpoint.store import STATE_FILE, CheckpointManager, load_tensors, read_json

__all__ = ["STATE_FILE", "CheckpointManager", "OutputDirLock", "claim_output_dir", "export_to_hf", "load_tensors",
           "read_json"]
