"""Full-tensor reductions over the local shards of a DTensor, without gathering the tensor.

An optimizer that needs a norm, an RMS or a row/column mean of a parameter sharded by tensor parallelism
or FSDP computes it from its local shard and all-reduces the partial result over the mesh dimensions along
which the reduced tensor dimension is sharded (``p.grad.full_tensor()`` would materialise the whole
gradient on every rank). Plain tensors take the same code path with no groups, so a one-process run does
no communication.

For a 2-D weight sharded ``Shard(0)`` (rows), row means are local and column means need an all-reduce;
``Shard(1)`` is the mirror image. Means are computed as ``sum / full size`` so that an empty or uneven
shard (FSDP pads the last rank) gives the right answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def sharded_dim(placement) -> int | None:
    """The tensor dim a placement splits (FSDP2-over-TP uses _StridedShard, which is not a Shard)."""
    return placement.dim if isinstance(placement, (Shard, _StridedShard)) else None


@dataclass(frozen=True)
class ShardLayout:
    """How a tensor is split over ranks: its full shape and, per tensor dim, the groups that shard it."""
    shape: torch.Size
    groups_by_dim: dict[int, tuple] = field(default_factory=dict)

    @property
    def groups(self) -> tuple:
        """Groups along which any dim is sharded: a full-tensor sum all-reduces over these."""
        return tuple(g for groups in self.groups_by_dim.values() for g in groups)

    def dim_groups(self, dim: int) -> tuple:
        return self.groups_by_dim.get(dim % len(self.shape), ())


def shard_layout(t: torch.Tensor) -> ShardLayout:
    """The layout of a DTensor (process group of each mesh dim that shards a tensor dim); trivial otherwise."""
    if not isinstance(t, DTensor):
        return ShardLayout(t.shape)
    groups_by_dim: dict[int, tuple] = {}
    for mesh_dim, placement in enumerate(t.placements):
        dim = sharded_dim(placement)
        if dim is not None:
            groups_by_dim[dim] = groups_by_dim.get(dim, ()) + (t.device_mesh.get_group(mesh_dim),)
    return ShardLayout(t.shape, groups_by_dim)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage); the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_grad(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The local shard of ``grad`` laid out like ``param`` (pending Partial sums are reduced first)."""
    if isinstance(grad, DTensor):
        if grad.placements != param.placements:
            grad = grad.redistribute(param.device_mesh, param.placements)
        return grad.to_local()
    return grad


def all_reduce_sum_(t: torch.Tensor, groups: tuple) -> torch.Tensor:
    """Sum ``t`` in place over each group in turn (over two mesh dims = over their 2-D sub-mesh)."""
    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def local_sum_of_squares(local: torch.Tensor) -> torch.Tensor:
    """Σx² over the local shard, accumulated in fp32."""
    return torch.linalg.vector_norm(local, dtype=torch.float32).square()


def full_sum_of_squares(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Σx² over the full tensor, in fp32, from the local shard."""
    return all_reduce_sum_(local_sum_of_squares(local), layout.groups)


def full_rms(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """Root mean square over the full tensor."""
    return (full_sum_of_squares(local, layout) / layout.shape.numel()).sqrt()


def full_mean(local: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    """Mean along ``dim`` of the full tensor, for the local slice of the other dims."""
    total = all_reduce_sum_(local.sum(dim=dim), layout.dim_groups(dim))
    return total / layout.shape[dim]


def reduced_layout(layout: ShardLayout, dim: int) -> ShardLayout:
    """The layout of ``x.sum(dim)`` for x laid out as ``layout`` (later dims shift down by one)."""
    dim %= len(layout.shape)
    shape = layout.shape[:dim] + layout.shape[dim + 1:]
    groups = {(d if d < dim else d - 1): g for d, g in layout.groups_by_dim.items() if d != dim}
    return ShardLayout(shape, groups)


def reduced_placements(param: DTensor, dim: int) -> list:
    """Placements of ``param.sum(dim)`` on the param's mesh (used to checkpoint factored moments)."""
    dim %= param.ndim
    placements = []
    for pl in param.placements:
        shard = sharded_dim(pl)
        if shard is None or shard < dim:
            placements.append(pl)
        elif shard == dim:
            placements.append(Replicate())
        elif type(pl) is Shard:
            placements.append(Shard(pl.dim - 1))
        else:
            raise NotImplementedError(f"factored state for {pl} on dim {pl.dim} > {dim}")
    return placements


class SquareSumAccumulator:
    """Σ‖g‖² over many parameters, local per parameter, reduced once per distinct set of shard groups.

    Replicated parameters are counted once; sharded ones are summed over the ranks holding their shards.
    ``total()`` does one all-reduce per distinct group set (a handful), not one per parameter.
    """

    def __init__(self):
        self._sums: dict[tuple, torch.Tensor] = {}

    def add(self, sq: torch.Tensor, layout: ShardLayout, extra_groups: tuple = ()) -> None:
        """``extra_groups``: more groups whose ranks hold different parameters of this kind (an expert-parallel
        group: each rank holds other experts), so the sum also runs over them."""
        key = layout.groups + tuple(extra_groups)
        self._sums[key] = self._sums[key] + sq if key in self._sums else sq.clone()

    def total(self) -> torch.Tensor:
        """Global Σ‖g‖² (fp32 scalar; 0 when nothing was added)."""
        total = torch.zeros((), dtype=torch.float32)
        for groups, value in self._sums.items():
            total = total.to(value.device) + all_reduce_sum_(value, groups)
        return total

    def reset(self) -> None:
        self._sums.clear()
