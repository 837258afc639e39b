"""Data parallelism with ZeRO stages 0–3 over the ``dp`` mesh dimension, torch-native.

| stage | mechanism | a rank keeps between steps |
|---|---|---|
| 0 | FSDP2-based ``replicate`` (DDP semantics: gradient all-reduce) | params, grads, optimizer state |
| 1 | ``replicate`` + ``shard_optimizer_state`` (each rank steps the parameters it owns, then broadcasts them) | params, grads, 1/dp of optimizer state |
| 2 | ``fully_shard(reshard_after_forward=False)`` | 1/dp of params, grads, optimizer state (full params from forward until backward) |
| 3 | ``fully_shard(reshard_after_forward=True)`` | 1/dp of everything; params gathered per layer in forward and again in backward |

HSDP (``parallel.dp_replicate`` > 1, ZeRO-2/3): ``dp_mesh`` is the 2-D (dp_replicate, dp_shard) mesh; a rank keeps
1/dp_shard of the parameters, gradients and optimizer state, all-gathers and reduce-scatters within its shard group
and all-reduces its gradient shard with the same shard of the other replicas.

Every stage SUMS gradients over dp (divide factor 1, sum-only collectives), so dividing each rank's summed token
loss by the step's global token count reproduces the one-process gradient exactly. Each decoder layer is its
own communication group, then the root (embedding, norm, head). All of it composes with DTensor tensor
parallel (2-D (dp, tp) parameters) and with pipeline stages (each stage is its own root).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from collie.layout_rules import check_cpu_offload
from collie.models.hf_backend import decoder_layers


def apply_data_parallel(model, dp_mesh, zero_stage: int, cpu_offload: bool = False,
                        compute_dtype: torch.dtype | None = None) -> None:
    """Wrap ``model`` (a whole model or a pipeline stage, possibly TP-sharded, possibly on meta) for ZeRO.
    ``dp_mesh``: 1-D over every data-parallel rank, or 2-D (replicate, shard) for HSDP at stages 2 and 3.
    ``compute_dtype`` (ZeRO-2/3 over fp32 master weights): parameters are gathered in it, gradients reduced
    in fp32."""
    check_cpu_offload(cpu_offload, zero_stage)
    layers = decoder_layers(model).values()
    if zero_stage in (0, 1):
        for layer in layers:
            replicate(layer, mesh=dp_mesh)
        replicate(model, mesh=dp_mesh)
    else:
        options = fsdp_options(dp_mesh, zero_stage, cpu_offload, compute_dtype)
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; SUM is exact everywhere


def fsdp_options(mesh, zero_stage: int, cpu_offload: bool, compute_dtype: torch.dtype | None) -> dict:
    """``fully_shard`` keyword arguments of ZeRO-2/3 over ``mesh``: stage 3 reshards parameters after forward,
    offload to pinned CPU memory on request, compute in ``compute_dtype`` with fp32 gradient reduction."""
    options = dict(mesh=mesh, reshard_after_forward=zero_stage == 3)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if compute_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return options


def set_gradient_sync(parts, enabled: bool) -> None:
    """Gradient accumulation: ``False`` before the backward of every micro-batch but the last (no dp traffic;
    gradients accumulate locally), ``True`` before the last."""
    for part in parts:
        if isinstance(part, FSDPModule):
            part.set_requires_gradient_sync(enabled)


# --- ZeRO-1: optimizer state sharded over dp ---------------------------------------------------------------

def shard_optimizer_state(optimizer: torch.optim.Optimizer, params, dp_group) -> list[list[torch.nn.Parameter]]:
    """ZeRO-1 on any optimizer: each dp rank owns a contiguous, size-balanced share of the parameters.

    Before ``step`` the gradients of parameters this rank does not own are dropped, so the optimizer skips them
    and never creates their state; after ``step`` each owner broadcasts its updated parameters (local shards
    for DTensors) over dp. Returns the owners' lists (index = dp rank). Optimizers that mix information across
    parameters inside ``step`` (a global norm) would see only the owned share: not for those.
    """
    params = [p for p in dict.fromkeys(params) if p.requires_grad]
    owners = _balanced_owners(params, dist.get_world_size(dp_group))
    mine = set(owners[dist.get_rank(dp_group)])

    def drop_unowned_grads(opt, args, kwargs):
        for p in params:
            if p not in mine:
                p.grad = None

    def broadcast_updates(opt, args, kwargs):
        for owner, owned in enumerate(owners):
            _broadcast_flat([_local(p).data for p in owned], owner, dp_group)

    optimizer.register_step_pre_hook(drop_unowned_grads)
    optimizer.register_step_post_hook(broadcast_updates)
    return owners


def _balanced_owners(params, n: int) -> list[list]:
    """Contiguous split of ``params`` into ``n`` runs of about equal element count (same on every rank)."""
    total = sum(_local(p).numel() for p in params)
    owners, seen = [[] for _ in range(n)], 0
    for p in params:
        size = _local(p).numel()
        owner = min(n - 1, int((seen + size / 2) * n / max(total, 1)))
        owners[owner].append(p)
        seen += size
    return owners


def _broadcast_flat(tensors: list[torch.Tensor], owner: int, group) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, group=group, group_src=owner)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# --- global gradient norm ----------------------------------------------------------------------------------

@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, ctx, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients to a global ``max_norm`` and return the norm of the FULL model's gradient.

    DTensor gradients (TP and/or ZeRO shards) are reduced over their mesh, plain ones (replicated) count once,
    and the per-stage norms are combined over pp. ``max_norm=inf`` only measures."""
    params = [p for p in dict.fromkeys(params) if p.grad is not None]
    grads = [p.grad for p in params if getattr(p, "expert_parallel_group", None) is None]
    total = _stage_norm(grads, norm_type, ctx.device)
    total = _with_expert_norm(total, params, norm_type, ctx.device)
    if ctx.pp > 1:
        if math.isinf(norm_type):
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=ctx.pp_group)
        else:
            total = total ** norm_type
            dist.all_reduce(total, group=ctx.pp_group)
            total = total ** (1.0 / norm_type)
    if params and not math.isinf(max_norm):
        for group in _split_by_mesh(params):  # torch's foreach cannot mix meshes (experts have their own)
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)  # takes parameters, not gradients
    return total


def _split_by_mesh(params) -> list[list]:
    """Parameters grouped by their DTensor mesh (plain tensors together): the routed experts of an MoE model sit
    on their own mesh under expert parallelism, and stay plain tensors beside tensor-parallel DTensors."""
    groups: dict = {}
    for p in params:
        groups.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return list(groups.values())


def _with_expert_norm(total: torch.Tensor, params, norm_type: float, device) -> torch.Tensor:
    """Under expert parallelism each rank of an ep group holds other experts (their parameters are tagged with the
    group by ``collie.distributed.expert_parallel``): their norm is combined over it, then with the rest."""
    experts = [p for p in params if getattr(p, "expert_parallel_group", None) is not None]
    if not experts:
        return total
    norm = _stage_norm([p.grad for p in experts], norm_type, device)
    group = experts[0].expert_parallel_group
    if math.isinf(norm_type):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return torch.maximum(total, norm)
    norm = norm ** norm_type
    dist.all_reduce(norm, group=group)
    return (total ** norm_type + norm) ** (1.0 / norm_type)


def _stage_norm(grads, norm_type: float, device) -> torch.Tensor:
    """Norm over this stage's gradients, grouped by mesh (torch's norm does not mix meshes or plain tensors)."""
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().to(device))
    if not norms:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)
