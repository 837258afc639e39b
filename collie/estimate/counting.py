"""Count the bytes that ``torch.distributed`` collectives move, to check ``estimate_communication`` against.

    with count_collective_bytes({"dp": ctx.dp_group, "tp": tp_group}) as counter:
        train_step()
    counter.payload_bytes()            # {("tp", "all_reduce"): 1234, ...}

Every collective reaches the dispatcher as a ``c10d.*`` op (``dist.all_reduce``, ``dist.send``, FSDP2's
all-gather/reduce-scatter, DDP's buckets) or a ``_c10d_functional.*`` op (DTensor redistributions, tensor
parallel plans), so one ``TorchDispatchMode`` sees them all, including those run by the autograd engine in
backward. ``CommDebugMode`` counts calls only and skips send/recv; this records sizes and groups.

**Payload** (what a record's ``bytes`` holds) is the size of the logical tensor the collective works on, the
same on every rank: all-reduce and broadcast: the buffer; all-gather: the gathered output; reduce-scatter: the
full input; send/recv/all-to-all: the buffer. ``wire_bytes`` turns a payload into what one rank sends with
bandwidth-optimal (ring) algorithms.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# op name (after the namespace, without trailing "_") → collective kind
_C10D_KINDS = {
    "allreduce": "all_reduce", "allreduce_coalesced": "all_reduce", "broadcast": "broadcast",
    "allgather": "all_gather", "_allgather_base": "all_gather", "allgather_coalesced": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather", "reduce_scatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "alltoall": "all_to_all", "alltoall_base": "all_to_all", "send": "send", "recv": "recv",
    "recv_any_source": "recv", "reduce": "reduce", "gather": "gather", "scatter": "scatter",
}
_FUNCTIONAL_KINDS = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "broadcast": "broadcast",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}
_FUNCTIONAL_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
# Collectives whose tensors hold at most this many elements are control traffic (loss sums, norms, flags).
CONTROL_MAX_NUMEL = 16


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call seen on this rank."""
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, send, recv, all_to_all, ...
    group: str  # the name given to its process group in ``groups``, else "group:<c10d name>"
    group_size: int
    bytes: int  # payload, see the module docstring
    numel: int  # elements of the largest tensor involved (small ones are control traffic)
    dtype: str

    @property
    def is_control(self) -> bool:
        return self.numel <= CONTROL_MAX_NUMEL


def wire_bytes(kind: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends for a collective of ``payload`` bytes over ``group_size`` ranks with ring
    algorithms (Patarasuk & Yuan 2009; NCCL's "bus bandwidth" convention): all-reduce 2(n−1)/n·B, all-gather
    and reduce-scatter (n−1)/n·B, broadcast (n−1)/n·B on average (pipelined chain), send B, recv 0."""
    n = group_size
    if n <= 1 and kind not in ("send", "recv"):
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "broadcast": (n - 1) / n, "all_to_all": (n - 1) / n, "send": 1.0, "recv": 0.0,
              "reduce": (n - 1) / n, "gather": (n - 1) / n, "scatter": (n - 1) / n}[kind]
    return factor * payload


class CollectiveCounter(TorchDispatchMode):
    """Records every collective dispatched while active; use through ``count_collective_bytes``."""

    def __init__(self, groups: dict | None = None):
        super().__init__()
        self.records: list[CollectiveRecord] = []
        self._names = {}
        for name, group in (groups or {}).items():
            if group is not None:
                self._names.setdefault(group.group_name, name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, op = func.namespace, func.__name__.split(".")[0].rstrip("_")
        if namespace == "c10d" and op in _C10D_KINDS:
            self._record_c10d(_C10D_KINDS[op], args)
        elif namespace in _FUNCTIONAL_NAMESPACES and op in _FUNCTIONAL_KINDS:
            self._record_functional(_FUNCTIONAL_KINDS[op], args)
        return func(*args, **kwargs)

    # --- argument decoding -----------------------------------------------------------------------------------
    def _record_c10d(self, kind: str, args) -> None:
        group = next((_unbox_group(a) for a in args if isinstance(a, torch.ScriptObject)
                      and _unbox_group(a) is not None), None)
        tensors = [_flat_tensors(a) for a in args if torch.is_tensor(a) or isinstance(a, (list, tuple))]
        if kind in ("all_gather", "reduce_scatter"):
            # c10d signatures: (output, input, ...); payload = the larger (gathered output / scattered input)
            sizes = [sum(_nbytes(t) for t in group_ts) for group_ts in tensors[:2]]
            payload = max(sizes)
        else:
            payload = sum(_nbytes(t) for t in tensors[0]) if tensors else 0
        flat = [t for ts in tensors for t in ts]
        self._add(kind, group.group_name if group else "?", group.size() if group else 1, payload, flat)

    def _record_functional(self, kind: str, args) -> None:
        name = next((a for a in reversed(args) if isinstance(a, str)), "?")
        tensors = _flat_tensors(args[0])
        group_size = _group_size(name)
        payload = sum(_nbytes(t) for t in tensors)
        if kind == "all_gather":
            payload *= group_size  # the input is this rank's shard
        self._add(kind, name, group_size, payload, tensors)

    def _add(self, kind, group_name, group_size, payload, tensors) -> None:
        largest = max(tensors, key=lambda t: t.numel(), default=None)
        self.records.append(CollectiveRecord(
            kind, self._names.get(group_name, f"group:{group_name}"), group_size, payload,
            largest.numel() if largest is not None else 0, str(largest.dtype) if largest is not None else "?"))

    # --- summaries -------------------------------------------------------------------------------------------
    def payload_bytes(self, include_control: bool = False) -> dict[tuple[str, str], int]:
        """Σ payload by (group, kind); control traffic (tiny tensors) left out unless asked for."""
        totals: dict = defaultdict(int)
        for r in self.records:
            if include_control or not r.is_control:
                totals[(r.group, r.kind)] += r.bytes
        return dict(totals)

    def wire_bytes_by_group(self, include_control: bool = False) -> dict[str, float]:
        """Σ bytes this rank sends, by group (ring algorithms, see ``wire_bytes``)."""
        totals: dict = defaultdict(float)
        for r in self.records:
            if include_control or not r.is_control:
                totals[r.group] += wire_bytes(r.kind, r.bytes, r.group_size)
        return dict(totals)

    def calls(self, include_control: bool = False) -> dict[tuple[str, str], int]:
        totals: dict = defaultdict(int)
        for r in self.records:
            if include_control or not r.is_control:
                totals[(r.group, r.kind)] += 1
        return dict(totals)


@contextlib.contextmanager
def count_collective_bytes(groups: dict | None = None):
    """Context manager yielding a ``CollectiveCounter`` that records the collectives run inside it.

    ``groups``: {name: ProcessGroup}, e.g. {"dp": ctx.dp_group, "tp": ctx.tp_mesh.get_group()}, so that
    records carry mesh-dimension names. A group of size one is never called; if two names share one group
    (a mesh dimension spanning the world reuses the default group) the first name wins."""
    counter = CollectiveCounter(groups)
    with counter:
        yield counter


def _unbox_group(obj):
    try:
        return dist.ProcessGroup.unbox(obj)
    except RuntimeError:  # a ReduceOp or another script object
        return None


def _group_size(group_name: str) -> int:
    try:
        return dist.distributed_c10d._resolve_process_group(group_name).size()
    except (RuntimeError, ValueError, KeyError):
        return 1


def _flat_tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
