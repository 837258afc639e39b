"""Checksums of a checkpoint's files and durable writes.

Every file of a ``step-N`` directory is listed in its ``manifest.json`` with its size and BLAKE2b digest. Each
rank hashes (and fsyncs) the files it wrote itself — its DCP shards ``__R_*.distcp``, ``rng_rankR.pt``, its
DeepSpeed partitions — so hashing runs in parallel and reads data still in the page cache; rank 0 takes the
rest. Verifying splits the files across ranks the same way and shares the verdict, so every rank agrees on
whether a checkpoint is intact. A checkpoint without a manifest (written before checksums existed) loads
with a warning that it cannot be verified.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import torch.distributed as dist

from collie.errors import CheckpointError

logger = logging.getLogger("collie")
MANIFEST = "manifest.json"
ALGORITHM = "blake2b"
_CHUNK = 1 << 20
# the rank that wrote a file, from its name: DCP shards, RNG states, DeepSpeed's per-rank partitions
_OWNER = re.compile(r"(?:^|/)(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt|.*zero_pp_rank_(\d+)_[^/]*)$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def file_digest(path: str, sync: bool = False) -> dict:
    """Size and BLAKE2b digest of ``path``, read in 1 MiB chunks; ``sync`` also fsyncs it to disk."""
    digest, size = hashlib.blake2b(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, ALGORITHM: digest.hexdigest()}


def list_files(directory: str) -> list[str]:
    """Every file under ``directory``, as sorted paths relative to it."""
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, n), directory) for n in names]
    return sorted(found)


def owner(relpath: str, world_size: int) -> int:
    """The rank that wrote ``relpath`` (by its name), else 0."""
    match = _OWNER.search(relpath)
    rank = int(next((g for g in match.groups() if g is not None), 0)) if match else 0
    return rank % world_size


def hash_own_files(directory: str, rank: int, world_size: int) -> dict:
    """Digests of the files under ``directory`` that this rank wrote, fsynced on the way."""
    return {rel: file_digest(os.path.join(directory, rel), sync=True) for rel in list_files(directory)
            if owner(rel, world_size) == rank}


def write_manifest(directory: str, files: dict) -> None:
    """``manifest.json`` listing ``files`` (relpath → digest), written and fsynced last."""
    manifest = {"format": 1, "algorithm": ALGORITHM, "saved_ns": time.time_ns(), "files": files}
    write_durably(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def write_durably(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(directory: str) -> None:
    """fsync every directory under ``directory`` (and itself), so their entries survive a power loss."""
    for parent, _, _ in os.walk(directory):
        fsync_dir(parent)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(directory: str) -> dict | None:
    """The manifest of a checkpoint; None when it has none; CheckpointError when it is damaged."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"expected algorithm {ALGORITHM} and a files object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot load checkpoint {directory}: {MANIFEST} is damaged ({e})") from None
    return manifest


def saved_ns(directory: str) -> int:
    """When a checkpoint was written: its manifest's time, else its trainer state's (or directory's) mtime."""
    try:
        return int(read_manifest(directory)["saved_ns"])
    except (CheckpointError, TypeError, KeyError, ValueError):
        pass
    for candidate in (os.path.join(directory, "trainer_state.json"), directory):
        if os.path.exists(candidate):
            return os.stat(candidate).st_mtime_ns
    return 0


def check_file(directory: str, relpath: str, expected: dict) -> str | None:
    """Why ``relpath`` does not match its manifest entry, or None when it does."""
    path = os.path.join(directory, relpath)
    if not os.path.isfile(path):
        return f"{relpath} is missing"
    size = os.path.getsize(path)
    if size != expected.get("size"):
        return f"{relpath} has {size} bytes, the manifest says {expected.get('size')} (truncated or replaced)"
    if file_digest(path)[ALGORITHM] != expected.get(ALGORITHM):
        return f"{relpath} does not match its {ALGORITHM} checksum (damaged on disk)"
    return None


def verify_files(directory: str, manifest: dict) -> None:
    """Check every file of the manifest; under torch.distributed each rank checks its share (a collective:
    every rank calls this) and all raise the same CheckpointError."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    entries = sorted(manifest["files"].items())
    problems = [p for i, (rel, expected) in enumerate(entries) if i % world == rank
                for p in [check_file(directory, rel, expected if isinstance(expected, dict) else {})] if p]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for share in gathered for p in share)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"cannot load checkpoint {directory}: {problems[0]}{more}")
