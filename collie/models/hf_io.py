"""Hugging Face model directories: ``config.json`` plus safetensors (single or sharded) or ``.bin`` weights.

Loading builds the model on the meta device, allocates it once on the target device and copies the
checkpoint in file by file, reading only the tensors it needs (``iter_hf_tensors`` lets each rank read just
what it keeps). Saving writes into a temporary sibling directory that replaces the target when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from collie.errors import CheckpointError, ConfigError
from collie.models.args import ModelArgs
from collie.models.registry import model_class_for_hf
from collie.schema import from_dict

CONFIG_NAME = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files a save replaces; anything else already in the target directory (tokenizer, README) is kept.
WEIGHT_FILE_PATTERNS = (CONFIG_NAME, "model*.safetensors", SAFE_INDEX, "pytorch_model*.bin", BIN_INDEX)
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_VOCAB_SIZE = 2**32  # token ids are stored as uint32 (the pretraining token cache)
MAX_PARAMETERS = 10**13  # ten trillion: far beyond any model that fits a cluster; larger is a typo  # buffers that older transformers versions saved
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# --- config -----------------------------------------------------------------------------------------------

def read_hf_config(path) -> dict:
    """The parsed ``config.json`` of a model directory."""
    file = Path(path) / CONFIG_NAME
    if not Path(path).exists():
        raise ConfigError(f"model directory '{path}' does not exist; {local_path_hint(path)}")
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a Hugging Face model directory must contain {CONFIG_NAME}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{file} is nested too deeply to be a model configuration") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object of model settings (model_type, hidden_size, …), "
                              f"not {type(config).__name__}")
    return config


def check_model_sizes(args: ModelArgs, where: str) -> None:
    """Refuse sizes no model can have (a typo such as ``vocab_size: 1e11``) before anything is allocated;
    ``where`` names the source (``model.arch``, a config.json) in the error."""
    if args.vocab_size > MAX_VOCAB_SIZE:
        raise ConfigError(f"{where} vocab_size={args.vocab_size} is out of range: must be <= {MAX_VOCAB_SIZE} "
                          f"(token ids are stored in 32 bits)")
    if args.num_params() > MAX_PARAMETERS:
        raise ConfigError(f"{where} the architecture has {args.num_params():.3g} parameters, more than "
                          f"{MAX_PARAMETERS:.0e}; check vocab_size, hidden_size, intermediate_size and "
                          f"num_hidden_layers")


def local_path_hint(path) -> str:
    """What to tell a user whose model or tokenizer path does not exist: where a relative path was looked
    for, and that a hub name (``meta-llama/Llama-2-7b``) is not a path."""
    text = str(path)
    where = "" if os.path.isabs(text) else f"relative paths resolve against the current directory {os.getcwd()}; "
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text):
        return (f"{where}'{text}' looks like a hub name, and collie never downloads: download it yourself (e.g. "
                f"`huggingface-cli download {text} --local-dir DIR`) and pass the local directory")
    return f"{where}collie reads local files only and never downloads from a hub"


def _class_and_args(path, overrides: dict | None = None):
    config, source = read_hf_config(path), str(Path(path) / CONFIG_NAME)
    cls = model_class_for_hf(config, source)
    try:
        args = cls.args_from_hf(config, CONFIG_NAME)
        check_model_sizes(args, f"{CONFIG_NAME}:")
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if overrides:
        args = from_dict(ModelArgs, {**dataclasses.asdict(args), **overrides}, "args_overrides")
    return cls, args, config


def load_hf_config(path) -> ModelArgs:
    """The ModelArgs described by a Hugging Face model directory's config.json."""
    return _class_and_args(path)[1]


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# --- loading ----------------------------------------------------------------------------------------------

def from_pretrained(path, device="cpu", dtype: torch.dtype | None = None, args_overrides: dict | None = None):
    """The registered model for a Hugging Face directory, with its weights, on ``device``.

    ``dtype=None`` keeps the checkpoint's dtype from config.json (float32 when absent). ``args_overrides``
    changes ModelArgs fields; fields that change tensor shapes make loading fail with the offending key.
    """
    cls, args, config = _class_and_args(path, args_overrides)
    with torch.device("meta"):
        model = cls(args)
    model.to(dtype or _config_dtype(config)).to_empty(device=device)  # rope buffers recompute on to_empty
    load_hf_weights(model, path)
    return model


def load_hf_weights(model, path, strict: bool = True) -> None:
    """Copy the checkpoint in ``path`` into ``model``'s allocated parameters. Every parameter must be found;
    with ``strict`` every checkpoint tensor must be used too (a pipeline stage that holds only some layers
    loads with ``strict=False``)."""
    cls, args = type(model), model.args
    targets, plan = hf_sources(model)
    index = checkpoint_index(path)
    ignored = {cls.hf_source("lm_head.weight", args)[0]} if args.tie_word_embeddings else set()
    _check_keys(path, index, plan, ignored if strict else set(index))
    with torch.no_grad():
        for key, tensor in iter_hf_tensors(path, plan, index):
            for fqn, transform in plan[key]:
                _copy_into(targets[fqn], tensor, transform, fqn, key, index[key])


@dataclasses.dataclass(frozen=True)
class StackedRows:
    """A ``hf_source`` transform: rows [start, stop) of a checkpoint tensor of ``total`` rows that stacks several
    parameters (Phi-3's ``qkv_proj``), so that a loader reading slices can read just the rows it needs."""
    start: int
    stop: int
    total: int

    def __call__(self, stacked: torch.Tensor) -> torch.Tensor:
        if stacked.shape[0] != self.total:
            raise RuntimeError(f"the stacked parts have {self.total} rows")
        return stacked[self.start:self.stop]


def hf_sources(model) -> tuple[dict, dict]:
    """The model's tensors (tied ones once) and checkpoint key → [(collie name, transform or None)]."""
    cls, args = type(model), model.args
    targets = _unique(model.state_dict(keep_vars=True))
    plan = defaultdict(list)
    for fqn in targets:
        key, transform = cls.hf_source(fqn, args)
        plan[key].append((fqn, transform))
    return targets, plan


def _unique(state: dict) -> dict:
    """The entries of ``state`` with tied tensors kept once (under their first name)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def _check_keys(path, index: dict, plan: dict, ignored: set) -> None:
    missing = [key for key in plan if key not in index]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs: "
                              f"{_some(missing)}")
    unexpected = [key for key in index
                  if key not in plan and key not in ignored and not key.endswith(IGNORED_KEY_SUFFIXES)]
    if unexpected:
        raise CheckpointError(f"{path}: the checkpoint has {len(unexpected)} tensor(s) the config does not use: "
                              f"{_some(unexpected)}; check num_hidden_layers, biases and tie_word_embeddings")


def _some(keys: list, n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" … and {len(keys) - n} more" if len(keys) > n else "")


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, transform, fqn: str, key: str, file: Path) -> None:
    where = f"{file}" if key == fqn else f"{key} in {file}"
    if transform is not None:
        try:
            tensor = transform(tensor)
        except RuntimeError as e:
            raise CheckpointError(f"{fqn}: checkpoint has {tuple(tensor.shape)} ({where}), which does not fit "
                                  f"the config: {e}") from e
    if tensor.shape != param.shape:
        raise CheckpointError(f"{fqn}: checkpoint has {tuple(tensor.shape)}, config expects "
                              f"{tuple(param.shape)} ({where})")
    param.copy_(tensor)


def checkpoint_index(path) -> dict[str, Path]:
    """Every tensor key of the checkpoint in ``path`` → the file holding it (safetensors preferred)."""
    path = Path(path)
    if (path / SAFE_WEIGHTS).is_file():
        return dict.fromkeys(_safetensors_keys(path / SAFE_WEIGHTS), path / SAFE_WEIGHTS)
    if (path / SAFE_INDEX).is_file():
        return _read_index(path / SAFE_INDEX)
    if (path / BIN_WEIGHTS).is_file():
        return dict.fromkeys(_load_bin(path / BIN_WEIGHTS), path / BIN_WEIGHTS)
    if (path / BIN_INDEX).is_file():
        return _read_index(path / BIN_INDEX)
    raise CheckpointError(f"{path}: no weights found; expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} "
                          f"or {BIN_INDEX}")


def _read_index(file: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid weight index (a JSON object with 'weight_map'): {e}") from e
    for key, shard in weight_map.items():
        if not (file.parent / shard).is_file():
            raise CheckpointError(f"{file} lists shard {shard} (holding {key}), but {file.parent / shard} "
                                  f"does not exist")
    return {key: file.parent / shard for key, shard in weight_map.items()}


def iter_hf_tensors(path, wanted_keys: Iterable[str] | None = None,
                    index: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor) for the wanted checkpoint keys (all by default), one file at a time, reading only
    those keys from each file."""
    index = checkpoint_index(path) if index is None else index
    by_file = defaultdict(list)
    for key in index if wanted_keys is None else wanted_keys:
        if key not in index:
            raise CheckpointError(f"{path}: the checkpoint has no tensor {key}")
        by_file[index[key]].append(key)
    for file, keys in by_file.items():
        yield from _read_safetensors(file, keys) if file.suffix == ".safetensors" else _read_bin(file, keys)


def _read_safetensors(file: Path, keys: list[str]):
    try:
        with safe_open(file, framework="pt") as f:
            for key in keys:
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is corrupted or truncated") from e


def _safetensors_keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is corrupted or truncated") from e


def _read_bin(file: Path, keys: list[str]):
    state = _load_bin(file)
    for key in keys:
        yield key, state[key]


def _load_bin(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for damaged or unsafe pickles
        raise CheckpointError(f"{file}: cannot read PyTorch weights ({e})") from e


# --- saving -----------------------------------------------------------------------------------------------

def save_pretrained(model, path, max_shard_size: int | str = "2GB", dtype: torch.dtype | None = None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + safetensors, sharded with an index above
    ``max_shard_size``), atomically: ``path`` is replaced only once everything is written."""
    cls, args = type(model), model.args
    state = cls.hf_state_dict(_unique(model.state_dict(keep_vars=True)), args)
    tensors = {key: _to_cpu(t, dtype) for key, t in state.items()}
    saved_dtype = dtype or next(t.dtype for t in tensors.values() if t.is_floating_point())
    dtype_name = str(saved_dtype).removeprefix("torch.")
    config = {**cls.hf_config(args), "dtype": dtype_name, "torch_dtype": dtype_name}
    shards = _split_shards(tensors, parse_size(max_shard_size))
    with atomic_directory(path, replace=WEIGHT_FILE_PATTERNS) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_shards(tmp, shards)


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or text such as "2GB" (10⁹) or "512MiB" (2²⁰)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if match is None:
        raise ConfigError(f"max_shard_size={size!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
    return int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()])


def _split_shards(tensors: dict, limit: int) -> list[dict]:
    """Consecutive groups of tensors of at most ``limit`` bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    return shards + [current]


def _write_shards(directory: Path, shards: list[dict]) -> None:
    if len(shards) == 1:
        save_file(shards[0], directory / SAFE_WEIGHTS, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path, replace: Iterable[str] = ()):
    """Yield an empty temporary sibling of ``path`` to fill; on success it takes the place of ``path``.

    Entries of an existing ``path`` that the new content does not provide and that match none of the
    ``replace`` patterns (e.g. a tokenizer next to the weights) are carried over by hard link or copy. On
    failure the temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            _carry_over(path, tmp, tuple(replace))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry_over(old: Path, new: Path, replace: tuple) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or any(fnmatch.fnmatch(entry.name, p) for p in replace):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src, dst) -> None:
    if not os.path.islink(src):
        with contextlib.suppress(OSError):  # e.g. another file system: copy instead
            os.link(src, dst)
            return
    shutil.copy2(src, dst, follow_symlinks=False)


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    backup = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)
