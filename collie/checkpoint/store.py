"""Checkpoint directories on disk: atomic ``step-N`` directories, and reading them without running code.

Tensors are written with ``torch.distributed.checkpoint`` (DCP) keyed by parameter name, so a checkpoint saved
at one dp/tp/pp layout loads at another: DCP reshards DTensor (tensor-parallel, FSDP) shards by name, and each
pipeline stage reads only the names it holds. A checkpoint is written into ``.tmp-step-N`` and renamed to
``step-N`` once every rank has finished, so a crash while saving leaves the previous checkpoints loadable and
the partial directory is removed at the next start. Loading never runs code from the checkpoint: JSON for the
trainer state, ``weights_only`` for RNG states and DCP's tensor files, and DCP's pickled ``.metadata`` is read
by an unpickler that admits only DCP's own metadata classes (``SafeFileSystemReader``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from collie.distributed.mesh import barrier
from collie.errors import CheckpointError

logger = logging.getLogger("collie")
STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every call without a process group; one process is a supported use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# --- reading without running code --------------------------------------------------------------------------

_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties",
        "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch.Size and dtypes; anything else (os.system, …) is refused unloaded."""

    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by ``_MetadataUnpickler`` (tensors already use weights_only)."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


LOAD_ERRORS = (CheckpointException, json.JSONDecodeError, pickle.UnpicklingError, EOFError, RuntimeError,
               ValueError, KeyError, TypeError, AttributeError, OSError)


def load_tensors(tensors: dict, path: str, no_dist: bool) -> None:
    """``dcp.load`` in place through ``SafeFileSystemReader``; CheckpointError naming ``path`` on failure."""
    try:
        with _single_process_quiet():
            dcp.load(tensors, checkpoint_id=path, storage_reader=SafeFileSystemReader(path), no_dist=no_dist)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {_root_cause(e)}") from None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def load_rng_file(path: str) -> dict:
    """An RNG state saved by ``rng_state``, loaded with ``weights_only`` (a pickled payload is refused)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises several types for damaged or unsafe pickles
        raise CheckpointError(f"cannot load {path}: {_root_cause(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor):
        raise CheckpointError(f"{path} is not an RNG state (expected a dict with a 'cpu' tensor)")
    return state


# --- the manager ------------------------------------------------------------------------------------------

class CheckpointManager:
    """Saves ``step-N`` directories under ``root``, keeps the newest ``keep_last``, finds the latest one."""

    def __init__(self, root: str, keep_last: int = 2):
        self.root, self.keep_last = root, keep_last

    def complete_checkpoints(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if STEP_DIR.match(n)
                       and os.path.exists(os.path.join(self.root, n, STATE_FILE)))
        return [os.path.join(self.root, n) for n in names]

    def latest(self) -> str | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete directories left by a save that did not finish (main process only)."""
        if _rank() == 0 and os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith(".tmp-"):
                    logger.warning("removing partial checkpoint %s", os.path.join(self.root, name))
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        barrier()

    def save(self, step: int, tensors: dict, trainer_state: dict, write_engine=None) -> str:
        """Write a checkpoint collectively (every rank calls this); returns the final directory.
        ``write_engine(directory)``: an engine that saves its own files (DeepSpeed), inside the same directory."""
        final = os.path.join(self.root, f"step-{step:08d}")
        tmp = os.path.join(self.root, f".tmp-step-{step:08d}")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if tensors:
            with _single_process_quiet():
                dcp.save(tensors, checkpoint_id=tmp, no_dist=not _distributed())
        if write_engine is not None:
            write_engine(tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
        barrier()
        if _rank() == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(trainer_state, f, indent=1, default=_jsonable)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str, tensors: dict) -> dict:
        """Load tensors in place into ``tensors`` (same structure as saved) and return the trainer state."""
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise CheckpointError(f"{path} is not a complete collie checkpoint: {STATE_FILE} is missing "
                                  f"(complete ones in {self.root}: {[os.path.basename(p) for p in self.complete_checkpoints()]})")
        state = read_json(state_file)
        if tensors:
            load_tensors(tensors, path, no_dist=not _distributed())
        rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
        if os.path.exists(rng_file):
            set_rng_state(load_rng_file(rng_file))
        return state


def _root_cause(error: Exception) -> str:
    """The last line of a (possibly multi-rank, traceback-laden) DCP error: the actual reason."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def _jsonable(value):
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} in the trainer state is not JSON-serializable")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
