"""The one place where a plain model becomes a distributed one, in order:

    pipeline stages → tensor parallel → context parallel → activation checkpointing → data parallel / ZeRO → weights

    ctx = init_parallel(cfg.parallel, device.type)
    model = build_model(args, device="meta")                     # no memory
    pm = parallelize(model, args, cfg.parallel, ctx, device, init_fn=lambda: full_cpu_state_dict)
    optimizer = build_optimizer(cfg, pm.parameters()); pm.prepare_optimizer(optimizer)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from collie.distributed.activation_checkpointing import apply_activation_checkpointing
from collie.distributed.context_parallel import ContextParallel
from collie.distributed.data_parallel import apply_data_parallel, shard_optimizer_state
from collie.distributed.expert_parallel import (ExpertParallel, apply_expert_parallel, build_expert_parallel,
                                                expert_parameters, mark_expert_parameters, shard_experts)
from collie.distributed.pipeline import PipelineRunner, build_stage_models
from collie.distributed.tensor_parallel import apply_tensor_parallel, vocab_parallel_token_loss_sum
from collie.errors import CheckpointError
from collie.layout_rules import check_cpu_offload, check_expert_parallel_model


@dataclass
class ParallelModel:
    """The model parts this rank holds (one, or two with the interleaved schedule) and how to run them."""
    parts: list
    stage_ids: list[int]
    ctx: object
    runner: PipelineRunner | None = None
    optimizer_owners: list = field(default_factory=list)
    context_parallel: ContextParallel | None = None  # with parallel.cp > 1: splits the engine's loss forwards
    expert_parallel: ExpertParallel | None = None  # with parallel.ep > 1: this rank's experts and its ep group

    def __call__(self, input_ids, **inputs):
        """Forward without pipeline parallelism (pp=1); with pp use ``runner.step`` / ``runner.eval_forward``.
        ``inputs``: the model's keyword inputs (position_ids, attention_mask, document_ids, cache)."""
        if self.runner is not None:
            raise RuntimeError("with parallel.pp > 1 the model runs through ParallelModel.runner "
                               "(step / eval_forward), not by calling it")
        return self.parts[0](input_ids, **inputs)

    def parameters(self):
        """Each parameter of this rank's parts once (DTensors under TP/ZeRO)."""
        return list(dict.fromkeys(p for part in self.parts for p in part.parameters()))

    def named_parameters(self):
        seen = {}
        for part in self.parts:
            for name, p in part.named_parameters():
                seen.setdefault(name, p)
        return list(seen.items())

    def train(self, mode: bool = True):
        for part in self.parts:
            part.train(mode)
            if mode:  # ZeRO-2 keeps gathered parameters after a forward without backward (evaluation): free them
                for module in part.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
        return self

    def eval(self):
        return self.train(False)

    def prepare_optimizer(self, optimizer) -> None:
        """Call once after building the optimizer on ``parameters()``: shards its state for ZeRO-1."""
        if self.ctx.cfg.zero_stage == 1 and self.ctx.gradient_ranks > 1:
            params, ep = self.parameters(), self.expert_parallel
            if ep is not None:  # experts: sharded over the ranks holding the same experts (when there are several)
                experts = set(expert_parameters(self.parts))
                params = [p for p in params if p not in experts]
                if ep.replicate_mesh.size() > 1:
                    shard_optimizer_state(optimizer, [p for p in self.parameters() if p in experts],
                                          ep.replicate_mesh.get_group())
            self.optimizer_owners = shard_optimizer_state(optimizer, params, self.ctx.gradient_group)


def parallelize(model, args, parallel_cfg, ctx, device, init_fn: Callable[[], dict] | None = None,
                activation_checkpointing: str = "none", checkpoint_every: int = 2,
                compute_dtype: torch.dtype | None = None
                ) -> ParallelModel:
    """Turn ``model`` (built on the meta device, in its final dtype) into this rank's parts, materialized on
    ``device``. ``init_fn()`` returns the full CPU state dict to start from; it is called on global rank 0
    only and broadcast. Without it the parts hold uninitialized memory: load weights with
    ``load_full_state_dict`` (e.g. shard by shard from a Hugging Face checkpoint). ``compute_dtype``: see
    ``apply_data_parallel``."""
    ctx.validate_model(args)
    check_expert_parallel_model(parallel_cfg.ep, args.architecture, args.num_experts)
    expert_parallel = build_expert_parallel(ctx, parallel_cfg.ep)
    if ctx.pp > 1:
        parts, stage_ids = build_stage_models(model, parallel_cfg, ctx.pp_rank)
    else:
        parts, stage_ids = [model], [0]
    check_cpu_offload(parallel_cfg.cpu_offload, parallel_cfg.zero_stage, parallel_cfg.engine, ctx.gradient_ranks,
                      ctx.world_size)
    context_parallel = (ContextParallel(ctx.cp_mesh, ctx.tp if parallel_cfg.sequence_parallel else 1)
                        if ctx.cp > 1 else None)
    for part in parts:
        if ctx.tp > 1:
            apply_tensor_parallel(part, ctx.tp_mesh, parallel_cfg.sequence_parallel, _plan_adapter(part))
        if context_parallel is not None:
            context_parallel.apply(part)
        if expert_parallel is not None:
            apply_expert_parallel(part, expert_parallel)
        apply_activation_checkpointing(part, activation_checkpointing, checkpoint_every)
        if ctx.gradient_ranks > 1:  # dp × cp ranks sum their gradients
            if expert_parallel is not None:
                shard_experts(part, expert_parallel, parallel_cfg.zero_stage, parallel_cfg.cpu_offload, compute_dtype)
            mesh = ctx.fsdp_mesh if parallel_cfg.zero_stage >= 2 else ctx.replicate_mesh
            apply_data_parallel(part, mesh, parallel_cfg.zero_stage, parallel_cfg.cpu_offload, compute_dtype)
    for part in parts:
        part.to_empty(device=device)
    parallel_model = ParallelModel(parts, stage_ids, ctx, context_parallel=context_parallel,
                                   expert_parallel=expert_parallel)
    if init_fn is not None:
        load_full_state_dict(parallel_model, init_fn() if ctx.rank == 0 else {}, broadcast_from_rank0=True)
    if expert_parallel is not None:
        mark_expert_parameters(parts, expert_parallel)
    if ctx.pp > 1:
        parallel_model.runner = PipelineRunner(parts, stage_ids, ctx, vocab_parallel_token_loss_sum)
    return parallel_model


def parallelize_loaded(model, parallel_cfg, ctx, activation_checkpointing: str = "none", checkpoint_every: int = 2,
                       compute_dtype: torch.dtype | None = None) -> ParallelModel:
    """Data parallelism / ZeRO over a model that every rank has already loaded in full on its device (the same
    weights everywhere: ``model.backend: hf``, which has no tensor or pipeline plan). Activation checkpointing,
    then ``apply_data_parallel``; ZeRO-2/3 keep only this rank's shards of what was loaded."""
    check_cpu_offload(parallel_cfg.cpu_offload, parallel_cfg.zero_stage, parallel_cfg.engine, ctx.dp, ctx.world_size)
    apply_activation_checkpointing(model, activation_checkpointing, checkpoint_every)
    if ctx.dp > 1:
        mesh = ctx.fsdp_mesh if parallel_cfg.zero_stage >= 2 else ctx.dp_mesh
        apply_data_parallel(model, mesh, parallel_cfg.zero_stage, parallel_cfg.cpu_offload, compute_dtype)
    return ParallelModel([model], [0], ctx)


def _plan_adapter(model):
    """How the tensor-parallel plan must change for what was added to the model (LoRA factors)."""
    if getattr(model, "lora_spec", None) is not None:
        from collie.peft.lora import lora_tensor_parallel_plan
        return lora_tensor_parallel_plan
    return None


def default_init_fn(model_class, args, seed: int, dtype=torch.float32) -> Callable[[], dict]:
    """``init_fn`` that builds the whole model on CPU with ``init_weights(seed)``: the one-process values."""
    def init() -> dict:
        with torch.device("meta"):
            full = model_class(args)
        full.to_empty(device="cpu")
        full.init_weights(seed)
        return full.to(dtype).state_dict()
    return init


def load_full_state_dict(parallel_model: ParallelModel, state_dict: dict, broadcast_from_rank0: bool = False):
    """Copy full (unsharded) tensors into this rank's shards.

    ``broadcast_from_rank0``: only global rank 0 passes tensors (the others pass {}), every rank calls, and
    every tensor of every part must be present. Otherwise each rank passes the same, possibly partial, dict
    (e.g. one safetensors shard at a time); keys a part does not hold are ignored."""
    ctx = parallel_model.ctx
    broadcast = broadcast_from_rank0 and ctx.world_size > 1
    if broadcast_from_rank0:
        _check_complete(parallel_model, _keys_from_rank0(state_dict, broadcast))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)
    for part in parallel_model.parts:
        if ctx.world_size == 1:
            own = part.state_dict().keys()
            part.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        else:
            set_model_state_dict(part, dict(state_dict), options=options)


def _keys_from_rank0(state_dict: dict, broadcast: bool) -> set:
    keys = [sorted(state_dict)]
    if broadcast:
        dist.broadcast_object_list(keys, src=0)
    return set(keys[0])


def _check_complete(parallel_model: ParallelModel, keys: set) -> None:
    missing = [k for part in parallel_model.parts for k in part.state_dict() if k not in keys]
    if missing:
        raise CheckpointError(f"the initial state dict lacks {len(missing)} tensors this rank holds, e.g. "
                              f"{missing[:3]}; it must hold every parameter of the model")


def gather_full_state_dict(parallel_model: ParallelModel) -> dict:
    """The full model's state dict (CPU tensors, Hugging Face names) on global rank 0; {} elsewhere. A
    collective: every rank calls. Tensors are gathered one at a time, so no rank holds more than its shards
    plus one full tensor (rank 0 accumulates the result)."""
    ctx, expert_parallel = parallel_model.ctx, parallel_model.expert_parallel
    ep_first_row = expert_parallel is not None and expert_parallel.replicate_mesh.get_local_rank() == 0
    mine = {}
    for part in parallel_model.parts:
        for name, value in get_model_state_dict(part).items():
            value = value.full_tensor() if isinstance(value, DTensor) else value
            if (ctx.dp_rank == 0 or ep_first_row) and ctx.tp_rank == 0:
                mine[name] = value.detach().cpu()
    if expert_parallel is not None:
        mine = _gather_experts(mine, expert_parallel)
    if ctx.pp == 1:
        return mine if ctx.rank == 0 else {}
    # One rank per stage (dp 0, tp 0) sends its stage's tensors to global rank 0 over the pp group.
    if ctx.dp_rank != 0 or ctx.tp_rank != 0:
        return {}
    gathered = [None] * ctx.pp if ctx.pp_rank == 0 else None
    dist.gather_object(mine, gathered, group=ctx.pp_group, group_dst=0)
    if ctx.pp_rank != 0:
        return {}
    full = {}
    for stage_dict in gathered:
        full.update(stage_dict)
    return full


def _gather_experts(mine: dict, expert_parallel: ExpertParallel) -> dict:
    """Under expert parallelism dp rank 0 holds only its own experts: the other ranks of its ep group (the first
    row of the grid, which kept their tensors too) send theirs to it. {} on those senders."""
    if expert_parallel.replicate_mesh.get_local_rank() != 0:
        return mine
    own = {k: v for k, v in mine.items() if ".experts." in k}
    gathered = [None] * expert_parallel.ep if expert_parallel.rank == 0 else None
    dist.gather_object(own, gathered, group=expert_parallel.group, group_dst=0)
    if expert_parallel.rank != 0:
        return {}
    for experts in gathered:
        mine.update(experts)
    return mine
