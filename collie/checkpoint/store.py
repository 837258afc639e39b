"""Checkpoint directories on disk: atomic ``step-N`` directories, and reading them without running code.

Tensors are written with ``torch.distributed.checkpoint`` (DCP) keyed by parameter name, so a checkpoint saved
at one dp/tp/pp layout loads at another: DCP reshards DTensor (tensor-parallel, FSDP) shards by name, and each
pipeline stage reads only the names it holds. A checkpoint is written into ``.tmp-step-N`` and renamed to
``step-N`` once every rank has finished, so a crash while saving leaves the previous checkpoints loadable and
the partial directory is removed at the next start. Before the rename every file is hashed and fsynced and
listed in ``manifest.json`` (``integrity``); loading verifies it, and ``resume=auto`` takes the newest intact
checkpoint (newest by when it was written, as pruning does). Loading never runs code from the checkpoint: JSON for the
trainer state, ``weights_only`` for RNG states and DCP's tensor files, and DCP's pickled ``.metadata`` is read
by an unpickler that admits only DCP's own metadata classes (``SafeFileSystemReader``).
"""
from __future__ import annotations

import contextlib
import errno
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

from collie.checkpoint import integrity
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
    """Saves ``step-N`` directories under ``root``, keeps the ``keep_last`` most recently written, finds the newest
    intact one."""

    def __init__(self, root: str, keep_last: int = 2):
        self.root, self.keep_last = root, keep_last
        self._verified: set[str] = set()  # checked by this manager already (resume=auto, then load)

    def checkpoints(self) -> list[str]:
        """Every ``step-N`` directory (intact or not), oldest first by when it was written."""
        if not os.path.isdir(self.root):
            return []
        found = [os.path.join(self.root, n) for n in os.listdir(self.root) if STEP_DIR.match(n)]
        return sorted(found, key=lambda p: (integrity.saved_ns(p), p))

    def complete_checkpoints(self) -> list[str]:
        """The ``step-N`` directories holding a trainer state, oldest first by when they were written (not by
        step number: a run that resumed an earlier step writes newer checkpoints with lower numbers)."""
        return [p for p in self.checkpoints() if os.path.exists(os.path.join(p, STATE_FILE))]

    def latest(self) -> str | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def latest_intact(self) -> str | None:
        """The most recently written checkpoint that passes ``verify``; damaged or incomplete newer ones are
        skipped with a warning naming them. Collective under torch.distributed (every rank calls it)."""
        for path in reversed(self.checkpoints()):
            try:
                self.verify(path)
                return path
            except CheckpointError as e:
                if _rank() == 0:
                    logger.warning("checkpoint.resume=auto: skipping %s: %s", path, e)
        return None

    def verify(self, path: str) -> None:
        """CheckpointError (one line, naming the file) unless ``path`` is a complete checkpoint whose files match
        their checksums. Without a manifest (saved before checksums) only the trainer state is checked."""
        if path in self._verified:
            return
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise CheckpointError(f"{path} is not a complete collie checkpoint: {STATE_FILE} is missing "
                                  f"(complete ones in {self.root}: {[os.path.basename(p) for p in self.complete_checkpoints()]})")
        manifest = integrity.read_manifest(path)
        if manifest is None:
            if _rank() == 0:
                logger.warning("%s has no %s (saved before checksums): its files cannot be verified", path,
                               integrity.MANIFEST)
        else:
            integrity.verify_files(path, manifest)
        read_json(state_file)
        self._verified.add(path)

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
        ``write_engine(directory)``: an engine that saves its own files (DeepSpeed), inside the same directory.
        A full disk raises CheckpointError saying so and removes the partial directory (after other failures it
        is removed at the next start); older checkpoints stay."""
        final = os.path.join(self.root, f"step-{step:08d}")
        tmp = os.path.join(self.root, f".tmp-step-{step:08d}")
        try:
            self._write(tmp, tensors, trainer_state, write_engine)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if not _disk_full(e):
                raise  # the partial directory is removed at the next start
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # free what it took
            raise CheckpointError(f"no space left on device while saving checkpoint {os.path.basename(final)} in "
                                  f"{self.root}; earlier checkpoints are intact: free space, then resume with "
                                  f"checkpoint.resume=auto") from None
        if _rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            integrity.fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _write(self, tmp: str, tensors: dict, trainer_state: dict, write_engine) -> None:
        """Every rank writes its files, hashes and fsyncs them; rank 0 adds the trainer state and the manifest."""
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
        files = _gather_to_main(integrity.hash_own_files(tmp, _rank(), _world_size()))
        if _rank() == 0:
            integrity.write_durably(os.path.join(tmp, STATE_FILE),
                                    json.dumps(trainer_state, indent=1, default=_jsonable))
            files[STATE_FILE] = integrity.file_digest(os.path.join(tmp, STATE_FILE))
            integrity.write_manifest(tmp, files)
            integrity.fsync_tree(tmp)

    def _prune(self) -> None:
        """Keep the ``keep_last`` most recently written checkpoints (those of this run, whatever their steps)."""
        for old in self.checkpoints()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str, tensors: dict) -> dict:
        """Verify ``path``, load tensors in place into ``tensors`` (same structure as saved) and return the
        trainer state."""
        self.verify(path)
        state = read_json(os.path.join(path, STATE_FILE))
        if tensors:
            load_tensors(tensors, path, no_dist=not _distributed())
        rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
        if os.path.exists(rng_file):
            set_rng_state(load_rng_file(rng_file))
        return state


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _gather_to_main(files: dict) -> dict:
    """Every rank's file digests, merged on rank 0 (the other ranks get {})."""
    if not _distributed():
        return files
    gathered = [None] * _world_size() if _rank() == 0 else None
    dist.gather_object(files, gathered, dst=0)
    return {k: v for share in gathered for k, v in share.items()} if _rank() == 0 else {}


def _disk_full(error: BaseException) -> bool:
    """Whether a save failed for lack of space: ENOSPC/EDQUOT anywhere in the chain, or its text (DCP wraps each
    rank's error; torch's zip writer reports a short write as 'unexpected pos')."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    return any(s in text for s in ("no space left", "disk quota exceeded", "unexpected pos"))


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
