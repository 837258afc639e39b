"""Expert parallelism (``parallel.ep``): the routed experts of every ``SparseMoE`` block are split over ``ep``
ranks, and tokens travel to their experts by all-to-all.

The ep groups are carved from the data-parallel ranks, as torchtitan does: the dp ranks form a
(dp/ep, ep) grid (``ExpertParallel.mesh``, dims "ep_replicate" × "ep"); the ``ep`` neighbouring ranks of a row
hold different experts (rank i of the row: experts i·E/ep … (i+1)·E/ep - 1) and read different batches, and the
dp/ep ranks of a column ("ep_replicate") hold the same experts. In each MoE block a rank routes its own tokens,
sends every (token, expert) assignment to the rank owning the expert (``all_to_all_single``; the per-expert
counts are exchanged first), runs its experts on what it received, sends the outputs back by a second all-to-all
and combines them with its routing weights exactly as the one-process block does (expert by expert, in token
order). Both all-to-alls are autograd-aware: backward returns the input gradients to their senders.

Gradients: an expert's gradient on its rank already sums the contributions of the whole ep row's tokens (they
came to it), so it is summed only over its replicas (the "ep_replicate" column: ``shard_experts`` wraps each
local expert with DDP / FSDP2 over that mesh); everything else is summed over all of dp as before, and the loss
is still divided by the step's global token count. Router losses and ``moe/load_*`` counts are computed from the
routing on the sender, before dispatch, so they need no change.

Checkpoints: the local experts keep their global names (``experts`` becomes a ModuleDict keyed by the global
index), so a rank's state dict holds ``…experts.<i>.…`` for its own experts only, and the DCP checkpoint (the union
over ranks) holds the full expert set: it loads at any ep degree.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from collie.distributed.data_parallel import fsdp_options
from collie.layout_rules import check_expert_parallel
from collie.models.moe import SparseMoE

EXPERT_GROUP_ATTR = "expert_parallel_group"  # set on expert parameters: the group their gradient norm spans


@dataclass
class ExpertParallel:
    """This rank's place in the (ep_replicate, ep) grid of the data-parallel ranks."""
    ep: int
    mesh: DeviceMesh  # ("ep_replicate", "ep"): this rank's grid

    @property
    def group(self):
        """The ranks that exchange tokens (and hold the whole expert set between them)."""
        return self.mesh["ep"].get_group()

    @property
    def rank(self) -> int:
        return self.mesh["ep"].get_local_rank()

    @property
    def replicate_mesh(self) -> DeviceMesh:
        """The dp/ep ranks holding the same experts: expert gradients are summed over it."""
        return self.mesh["ep_replicate"]

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.ep
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def build_expert_parallel(ctx, ep: int) -> ExpertParallel | None:
    """The (dp/ep, ep) grid over the data-parallel ranks of each (pipeline stage, tp rank) (a collective: every
    rank calls); None for ep=1."""
    if ep == 1:
        return None
    check_expert_parallel(ep, dp=ctx.dp, cp=ctx.cp, dp_replicate=ctx.dp_replicate)
    # world = pp × dp × tp in that order (cp and dp_replicate are 1); one grid per (pp, tp) coordinate, the
    # grids stacked along a first dimension that only orders them
    ranks = torch.arange(ctx.world_size).reshape(ctx.pp, ctx.dp // ep, ep, ctx.tp).permute(0, 3, 1, 2)
    mesh = DeviceMesh(ctx.device.type, ranks.reshape(-1, ctx.dp // ep, ep),
                      mesh_dim_names=("ep_grids", "ep_replicate", "ep"))
    from torch.distributed.distributed_c10d import _set_pg_timeout  # as collie.distributed.mesh does
    for dim in ("ep_replicate", "ep"):
        _set_pg_timeout(datetime.timedelta(seconds=ctx.cfg.timeout_s), mesh[dim].get_group())
    return ExpertParallel(ep, mesh[("ep_replicate", "ep")])  # this rank's grid


def apply_expert_parallel(model: nn.Module, expert_parallel: ExpertParallel) -> None:
    """Keep this rank's experts in every MoE block (under their global indices) and dispatch by all-to-all."""
    for block in model.modules():
        if isinstance(block, SparseMoE):
            local = expert_parallel.local_experts(block.num_experts)
            block.experts = nn.ModuleDict({str(i): block.experts[i] for i in local})
            block.dispatch = AllToAllDispatch(expert_parallel.group, expert_parallel.ep, len(local))


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [expert for block in model.modules() if isinstance(block, SparseMoE) for expert in block.experts.values()]


def shard_experts(model: nn.Module, expert_parallel: ExpertParallel, zero_stage: int, cpu_offload: bool = False,
                  compute_dtype: torch.dtype | None = None) -> None:
    """Before ``apply_data_parallel``: each local expert is its own DDP / FSDP2 unit over the replicas of its
    experts (``replicate_mesh``), so that the layer's dp-wide unit leaves its parameters alone. Call
    ``apply_data_parallel`` afterwards: it sets the sum-only reduction on every unit."""
    mesh = expert_parallel.replicate_mesh
    for expert in expert_modules(model):
        if zero_stage in (0, 1):
            replicate(expert, mesh=mesh)
        else:
            fully_shard(expert, **fsdp_options(mesh, zero_stage, cpu_offload, compute_dtype))


def mark_expert_parameters(parts, expert_parallel: ExpertParallel) -> None:
    """Tag the (materialized) expert parameters with the ep group: the global gradient norm sums their squares
    over it (``clip_grad_norm_``)."""
    for part in parts:
        for expert in expert_modules(part):
            for param in expert.parameters():
                setattr(param, EXPERT_GROUP_ATTR, expert_parallel.group)


def expert_parameters(parts) -> list:
    return [p for part in parts for expert in expert_modules(part) for p in expert.parameters()]


class AllToAllDispatch:
    """``SparseMoE.dispatch`` under expert parallelism: tokens to the experts' ranks and back (see the module
    docstring). ``num_local``: experts per rank; this rank's are ``block.experts`` in global order."""

    def __init__(self, group, ep: int, num_local: int):
        self.group, self.ep, self.num_local = group, ep, num_local

    def __call__(self, block: SparseMoE, flat: torch.Tensor, weights: torch.Tensor,
                 chosen: torch.Tensor) -> torch.Tensor:
        k = chosen.shape[1]
        assignment_expert = chosen.reshape(-1)  # assignment a = token·k + slot
        order = torch.argsort(assignment_expert, stable=True)  # by expert, each expert's tokens in token order
        token, slot = order // k, order % k
        sent = torch.bincount(assignment_expert, minlength=block.num_experts)  # assignments per expert
        received = torch.empty_like(sent)  # (ep source ranks × my experts)
        dist.all_to_all_single(received, sent, group=self.group)
        send_splits = sent.view(self.ep, self.num_local).sum(1).tolist()
        receive_splits = received.view(self.ep, self.num_local).sum(1).tolist()
        inputs = self._all_to_all(flat.index_select(0, token), receive_splits, send_splits)
        outputs = self._run_local(block, inputs, received)
        back = self._all_to_all(outputs, send_splits, receive_splits)  # rows in ``order``
        y = back * weights[token, slot, None]
        out = torch.zeros_like(flat)
        bounds = [0, *torch.cumsum(sent, 0).tolist()]
        for start, end in zip(bounds, bounds[1:]):  # expert by expert, as the one-process block adds them
            out.index_add_(0, token[start:end], y[start:end].to(out.dtype))
        return out

    def _run_local(self, block: SparseMoE, inputs: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """Each local expert on the rows it received (from every source rank); every expert runs, on zero rows
        if none came, so that its gradient exists for the data-parallel reduction."""
        row_expert = torch.arange(self.num_local, device=inputs.device).repeat(self.ep).repeat_interleave(received)
        results = []
        for index, expert in enumerate(block.experts.values()):
            rows = torch.nonzero(row_expert == index).reshape(-1)
            results.append((rows, expert(inputs.index_select(0, rows))))
        outputs = results[0][1].new_zeros(inputs.shape[0], results[0][1].shape[-1])
        for rows, y in results:
            outputs = outputs.index_add(0, rows, y)
        return outputs

    def _all_to_all(self, tensor: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        output = tensor.new_empty(sum(output_splits), tensor.shape[-1])
        return dist_fn.all_to_all_single(output, tensor.contiguous(), output_splits, input_splits, group=self.group)
