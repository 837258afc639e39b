"""Load a Hugging Face checkpoint straight into each rank's placement.

Every rank reads only the tensors of the pipeline stage(s) it holds, and of those only the rows/columns of its
own tensor-parallel / ZeRO shard (safetensors slices), so no rank materialises the full model. A tensor whose
collie layout differs from the checkpoint's (InternLM2's packed ``wqkv``) or that comes from a ``.bin`` file is
read whole, one at a time, and then cut; one stacked with others along its rows (Phi-3's ``qkv_proj``) is sliced.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from collie.errors import CheckpointError
from collie.models.hf_io import StackedRows, _check_keys, _copy_into, checkpoint_index, hf_sources, iter_hf_tensors


@torch.no_grad()
def load_hf_checkpoint(parallel_model, path) -> int:
    """Copy the checkpoint in ``path`` into the parts of ``parallel_model`` (materialised, uninitialised).
    Returns the bytes this rank read, for the log and tests."""
    index = checkpoint_index(path)
    bytes_read = 0
    for part in parallel_model.parts:
        targets, plan = hf_sources(part)
        _check_keys(path, index, plan, set(index))  # a stage holds some layers: extra keys are other stages'
        for key, entries in plan.items():
            for fqn, transform in entries:
                bytes_read += _load_one(targets[fqn], key, transform, fqn, index[key])
    return bytes_read


def _load_one(param: torch.Tensor, key: str, transform, fqn: str, file: Path) -> int:
    local = param.to_local() if isinstance(param, DTensor) else param
    window = _window(param)
    sliceable = transform is None or isinstance(transform, StackedRows)
    if window is not None and sliceable and file.suffix == ".safetensors":
        shape = param.shape
        if transform is not None:  # the same window, moved down to the parameter's rows of the stacked tensor
            shape = (transform.total, *param.shape[1:])
            window = (slice(window[0].start + transform.start, window[0].stop + transform.start), *window[1:])
        tensor = _read_slice(file, key, window, shape, fqn)
        _copy_into(local, tensor, None, fqn, key, file)
        return tensor.numel() * tensor.element_size()
    (_, tensor), = iter_hf_tensors(file.parent, [key], {key: file})
    read = tensor.numel() * tensor.element_size()
    if not isinstance(param, DTensor):
        _copy_into(param, tensor, transform, fqn, key, file)
        return read
    if transform is not None:
        tensor = transform(tensor)
    _copy_into(local, _local_part(param, tensor, fqn, file), None, fqn, key, file)
    return read


def _window(param) -> tuple[slice, ...] | None:
    """This rank's block of a DTensor (None for a plain tensor). FSDP2 over tensor parallel shards a shard
    (``_StridedShard``), which still leaves each rank one contiguous block."""
    if not isinstance(param, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _read_slice(file: Path, key: str, window: tuple[slice, ...], shape, fqn: str) -> torch.Tensor:
    try:
        with safe_open(file, framework="pt") as f:
            stored = f.get_slice(key)
            if tuple(stored.get_shape()) != tuple(shape):
                raise CheckpointError(f"{fqn}: checkpoint has {tuple(stored.get_shape())}, config expects "
                                      f"{tuple(shape)} ({key} in {file})")
            return stored[window]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is corrupted or truncated") from e


def _local_part(param: DTensor, full: torch.Tensor, fqn: str, file: Path) -> torch.Tensor:
    """This rank's shard of the whole tensor ``full``, cut locally (no communication)."""
    if tuple(full.shape) != tuple(param.shape):
        raise CheckpointError(f"{fqn}: checkpoint has {tuple(full.shape)}, config expects {tuple(param.shape)} "
                              f"({file})")
    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None).to_local()
