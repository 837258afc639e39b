"""Pretraining data: documents → one cached, memory-mapped token stream → fixed-length blocks.

**Tokenization, once.** Every document becomes ``[BOS] tokens [EOS]`` (BOS only where the tokenizer has one
distinct from EOS; empty documents are skipped and counted). The concatenation is written to
``cache_dir/<name>-<key>/tokens.bin`` (uint16 when the vocabulary fits, else uint32) with the document start
offsets in ``doc_starts.npy`` and the counts in ``meta.json``. ``key`` hashes the sources (paths, sizes, mtimes),
the tokenizer (its model) and the reading options, so a changed file or tokenizer re-tokenizes while a new
``seq_len`` or masking choice reuses the cache. The directory is written under a temporary name and renamed
when complete: a crash never leaves a cache that is trusted later, and two writers of one cache cannot clash.

**Packing.** Block ``i`` is tokens ``[i·seq_len, (i+1)·seq_len)`` of the stream; the final partial block is
dropped (stats report its tokens). ``labels`` equal ``input_ids``: the loss shifts them, so position t learns
labels[t+1], and the last token of a document learns to predict EOS. With ``document_masking``,
``position_ids`` restart at 0 at every document start inside a block (and at the block start), and the label at
each restart is IGNORE_INDEX, so EOS is never trained to predict the next document's first token: every document
part trains as if it were a sequence of its own, provided the model attends through
``document_causal_mask(position_ids)``. Without it, blocks attend across documents (the GPT recipe) and EOS
learns to predict what follows it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import operator
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from collie.data.collate import IGNORE_INDEX
from collie.data.sources import Malformed, expand_sources, read_documents, source_fingerprint
from collie.errors import DataError

logger = logging.getLogger("collie")

CACHE_VERSION = 1


@dataclass
class PretrainStats:
    """What loading made of the corpus; skipped records and dropped tokens are reported, never hidden."""
    files: int = 0
    documents: int = 0
    empty: int = 0
    malformed: int = 0
    first_malformed: str | None = None
    tokens: int = 0
    blocks: int = 0
    dropped_tokens: int = 0
    cache_dir: str = ""
    cache_hit: bool = False

    def __str__(self) -> str:
        return (f"{self.documents} documents in {self.files} source{'s' * (self.files != 1)} -> {self.tokens} "
                f"tokens -> {self.blocks} blocks ({self.dropped_tokens} tail tokens dropped); skipped {self.empty} "
                f"empty documents and {self.malformed} malformed records; token cache "
                f"{'reused' if self.cache_hit else 'written'}: {self.cache_dir}")


class PackedDataset(Dataset):
    """Blocks ``{"input_ids", "labels", "position_ids"}`` (LongTensors of ``seq_len``) over a token cache.

    Index-addressable and deterministic, so ``BatchStream`` can shard, shuffle and resume it. The tokens are
    memory-mapped on first access in each process (DataLoader workers included), never copied or pickled.
    """

    def __init__(self, cache_dir: str | os.PathLike, seq_len: int, document_masking: bool = False):
        self.cache_dir, self.seq_len, self.document_masking = Path(cache_dir), seq_len, document_masking
        self.meta = read_meta(self.cache_dir)
        self.doc_starts = read_doc_starts(self.cache_dir, self.meta)
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.cache_dir / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                                     shape=(self.meta["tokens"],))
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return self.meta["tokens"] // self.seq_len

    def __getitem__(self, index: int) -> dict:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} is out of range for {len(self)} blocks")
        begin = index * self.seq_len
        input_ids = torch.from_numpy(self.tokens[begin:begin + self.seq_len].astype(np.int64))
        if not self.document_masking:
            return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": torch.arange(self.seq_len)}
        position_ids = torch.from_numpy(block_positions(self.doc_starts, begin, self.seq_len))
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(position_ids == 0, IGNORE_INDEX),
                "position_ids": position_ids}


def load_pretrain_dataset(files, tokenizer, seq_len: int, cache_dir: str | os.PathLike | None = None,
                          text_field: str = "text", txt_documents: str = "paragraph", document_masking: bool = False,
                          skip_malformed: bool = False, is_main_process: bool = True,
                          barrier: Callable[[], None] | None = None) -> tuple[PackedDataset, PretrainStats]:
    """Tokenize ``files`` into the cache (unless already there) and pack them into blocks of ``seq_len``.

    ``files``: paths or glob patterns (see ``collie.data.sources``). ``cache_dir``: null = the user cache
    (``$XDG_CACHE_HOME`` or ``~/.cache``) ``/collie/pretrain``. In a multi-process job every process calls this;
    only those with ``is_main_process`` write a missing cache (one per node on node-local disks, or one per job on
    a shared one; more are safe but redundant), and all then call ``barrier`` before reading it. ``barrier`` is
    called even when writing fails, so the other processes never wait forever.
    """
    paths = expand_sources(files)
    options = {"text_field": text_field, "txt_documents": txt_documents, "skip_malformed": skip_malformed}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = root / f"{paths[0].stem}-{cache_key(paths, tokenizer, options)}"
    cache_hit = is_complete(directory)
    try:
        if is_main_process and not cache_hit:
            write_token_cache(paths, tokenizer, directory, options)
    finally:
        if barrier is not None:
            barrier()
    if not is_complete(directory):
        raise DataError(f"token cache '{directory}' was not written: the main process failed (see its error) or "
                        f"cannot see the same cache directory as this process")
    dataset = PackedDataset(directory, seq_len, document_masking)
    stats = dataset_stats(dataset, cache_hit)
    if stats.blocks == 0:
        raise DataError(f"{', '.join(map(str, paths))}: {stats.tokens} tokens are fewer than one block of "
                        f"seq_len={seq_len}; add text or lower data.seq_len")
    if stats.empty or stats.malformed:
        logger.warning("pretraining data: skipped %d empty documents and %d malformed records%s", stats.empty,
                       stats.malformed, f" (first: {stats.first_malformed})" if stats.first_malformed else "")
    return dataset, stats


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of each token's document: a new one starts where a position does not continue the
    previous one by 1 (packed documents restart at 0; right padding from ``pad_collate`` starts another)."""
    position_ids = torch.atleast_2d(position_ids)
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return F.pad(starts.long().cumsum(-1), (1, 0))


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, 1, seq, seq) mask, True where query i may attend key j: j <= i within one document."""
    docs = document_ids(position_ids)
    seq_len = docs.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=docs.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def block_positions(doc_starts: np.ndarray, begin: int, length: int) -> np.ndarray:
    """Positions of tokens ``[begin, begin + length)`` counted from the last document start or the block start."""
    first, last = np.searchsorted(doc_starts, [begin, begin + length])
    restarts = np.zeros(length, dtype=bool)
    restarts[0] = True
    restarts[doc_starts[first:last] - begin] = True
    index = np.arange(length)
    return index - np.maximum.accumulate(np.where(restarts, index, 0))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "collie" / "pretrain"


def cache_key(paths: list[Path], tokenizer, options: dict) -> str:
    """A hash of everything the token stream depends on."""
    payload = {"version": CACHE_VERSION, "sources": source_fingerprint(paths), "options": options,
               "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the sentencepiece model or HF tokenizer definition where
    reachable, else the tokenizer's name and its encoding of a probe text; plus the special ids."""
    if hasattr(tokenizer, "sp"):
        model = tokenizer.sp.serialized_model_proto()
    elif hasattr(getattr(tokenizer, "hf", None), "backend_tokenizer"):
        model = tokenizer.hf.backend_tokenizer.to_str().encode()
    elif hasattr(tokenizer, "hf"):
        model = json.dumps(sorted(tokenizer.hf.get_vocab().items())).encode()
    else:
        probe = "The quick brown fox jumps over the lazy dog. 0123456789 café\n\tend"
        model = repr((getattr(tokenizer, "name", type(tokenizer).__name__), tokenizer.encode(probe))).encode()
    specials = (type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    return hashlib.sha256(model + repr(specials).encode()).hexdigest()


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()  # written last, inside a directory published by one rename


def read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        tokens, dtype = meta["tokens"], np.dtype(meta["dtype"])
        if not (isinstance(tokens, int) and tokens >= 0 and dtype in (np.uint16, np.uint32)):
            raise ValueError(f"tokens={tokens!r}, dtype={meta['dtype']!r}")
        size = (directory / "tokens.bin").stat().st_size
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise _corrupted(directory, f"meta.json or tokens.bin unreadable: {type(e).__name__}: {e}") from None
    if size != tokens * dtype.itemsize:
        raise _corrupted(directory, f"tokens.bin has {size} bytes, meta.json says {tokens * dtype.itemsize}")
    return meta


def read_doc_starts(directory: Path, meta: dict) -> np.ndarray:
    """The document start offsets, checked against the cache's meta (never unpickled)."""
    try:
        starts = np.load(directory / "doc_starts.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _corrupted(directory, f"doc_starts.npy is not a plain NumPy array: {type(e).__name__}: "
                                    f"{str(e).split('. ')[0]}") from None
    if not (starts.ndim == 1 and starts.dtype.kind in "iu" and len(starts) >= 2 and starts[0] == 0
            and starts[-1] == meta["tokens"] and bool(np.all(np.diff(starts) > 0))):
        raise _corrupted(directory, "doc_starts.npy does not hold increasing document offsets ending at the "
                                    "token count of meta.json")
    return starts


def _corrupted(directory: Path, reason: str) -> DataError:
    return DataError(f"token cache '{directory}' is corrupted ({' '.join(reason.split())}); delete that directory "
                     f"to re-tokenize")


def dataset_stats(dataset: PackedDataset, cache_hit: bool) -> PretrainStats:
    meta = dataset.meta
    blocks = len(dataset)
    counts = {f.name: meta[f.name] for f in fields(PretrainStats) if f.name in meta}
    return PretrainStats(**counts, blocks=blocks, dropped_tokens=meta["tokens"] - blocks * dataset.seq_len,
                         cache_dir=str(dataset.cache_dir), cache_hit=cache_hit)


def write_token_cache(paths: list[Path], tokenizer, directory: Path, options: dict) -> None:
    """Tokenize ``paths`` into ``directory``, atomically: a temporary sibling renamed when complete. When it
    fails, the directories it created for the cache are removed again (a failed run leaves nothing behind)."""
    created = [p for p in (directory.parent, *directory.parent.parents) if not p.exists()]
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f"{directory.name}.tmp-"))
    except OSError as e:
        raise DataError(f"cannot create the token cache in '{directory.parent}' (data.cache_dir, by default "
                        f"<train.output_dir>/data_cache): {e.strerror or e}") from None
    logger.info("tokenizing %d sources into the token cache %s", len(paths), directory)
    try:
        temporary.chmod(0o755)  # mkdtemp makes it private; the published cache is readable like any data file
        meta = tokenize_documents(paths, tokenizer, temporary / "tokens.bin", options)
        starts = io.BytesIO()
        np.save(starts, meta.pop("doc_starts"))
        _write_synced(temporary / "doc_starts.npy", starts.getvalue())
        _write_synced(temporary / "meta.json", json.dumps(meta, indent=1).encode())
        try:
            os.rename(temporary, directory)
        except OSError:
            if not is_complete(directory):
                raise  # otherwise another process published the same cache first: keep theirs
    except BaseException as e:
        shutil.rmtree(temporary, ignore_errors=True)
        for path in created:  # deepest first; only if still empty (another process may share them)
            with contextlib.suppress(OSError):
                path.rmdir()
        if isinstance(e, OSError):
            raise DataError(f"cannot write the token cache '{directory}': {e.strerror or e}") from None
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def tokenize_documents(paths: list[Path], tokenizer, out: Path, options: dict) -> dict:
    """Write the token stream of ``paths`` to ``out``; returns the cache's meta with ``doc_starts``."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer '{getattr(tokenizer, 'name', tokenizer)}' has no EOS token, which pretraining "
                        f"needs to separate documents")
    dtype, malformed = token_dtype(tokenizer.vocab_size), Malformed(options["skip_malformed"])
    starts, empty = [0], 0
    with open(out, "wb") as f:
        for path in paths:
            for text in read_documents(path, options["text_field"], options["txt_documents"], malformed):
                if not text.strip():
                    empty += 1
                    continue
                ids = encode_document(tokenizer, text, dtype)
                f.write(ids.tobytes())
                starts.append(starts[-1] + len(ids))
        f.flush()
        os.fsync(f.fileno())
    if len(starts) == 1:
        raise DataError(f"no documents in {', '.join(map(str, paths))} ({empty} empty, {malformed.count} malformed"
                        f"{f'; first: {malformed.first}' if malformed.first else ''})")
    return {"version": CACHE_VERSION, "dtype": dtype.name, "tokens": starts[-1], "documents": len(starts) - 1,
            "files": len(paths), "empty": empty, "malformed": malformed.count, "first_malformed": malformed.first,
            "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__), "options": options,
            "doc_starts": np.asarray(starts, dtype=np.int64)}


def encode_document(tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """``[BOS] tokens EOS`` as ``dtype``; BOS is left out when the tokenizer has none or it is the EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = np.asarray(tokenizer.encode(text, add_bos=bos is not None and bos != eos, add_eos=True), dtype=np.int64)
    outside = ids[(ids < 0) | (ids >= tokenizer.vocab_size)]
    if outside.size:
        raise DataError(f"tokenizer '{getattr(tokenizer, 'name', tokenizer)}' produced id {outside[0]} outside its "
                        f"vocabulary of {tokenizer.vocab_size}")
    return ids.astype(dtype)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
