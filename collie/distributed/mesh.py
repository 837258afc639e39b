"""The process layout of a job: torchrun environment → process group → a (pp, dp_replicate, dp_shard, cp, tp)
DeviceMesh, with (dp_replicate, dp_shard) flattened into "dp": the whole data-parallel group.

    ctx = init_parallel(cfg.parallel, "cuda")   # or "cpu" (gloo)
    ctx.validate_model(model_args)              # ConfigError before anything is built
    ...
    ctx.destroy()

``tp`` is the innermost mesh dimension (neighbouring ranks, the fastest links), ``pp`` the outermost. Data
parallelism is ``dp = dp_replicate × dp_shard`` (``parallel.dp_replicate``, default 1): everything that needs the
whole data-parallel group (data sharding, loss and token sums, ZeRO-0/1) uses "dp"; ZeRO-2/3 shard over
"dp_shard" and, with ``dp_replicate > 1`` (HSDP), all-reduce across "dp_replicate" (``fsdp_mesh``). Ranks of a
shard group are neighbours (after tp), so a shard group of at most a node's GPUs stays inside the node.

Context parallelism (``parallel.cp``) splits each sequence over the "cp" ranks of a data-parallel replica: they
read the same batches (data sharding uses "dp" only) but hold different tokens, so gradients are summed over
dp × cp: ZeRO-0/1 replicate over "dp_cp" (dp_replicate, dp_shard, cp flattened) and ZeRO-2/3 shard over it (or
over "dp_shard_cp" within each HSDP replica), as torchtitan folds cp into its data-parallel mesh. A single
process started without torchrun gets a world of one: no process group, no mesh, every degree 1.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from collie import layout_rules
from collie.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLAT_DP = ("dp_replicate", "dp_shard")  # flattened into "dp"
FLAT_DP_CP = ("dp_replicate", "dp_shard", "cp")  # flattened into "dp_cp" (with cp > 1): gradients are summed over it
FLAT_SHARD_CP = ("dp_shard", "cp")  # flattened into "dp_shard_cp" (with cp > 1): what ZeRO-2/3 shard over under HSDP


@dataclass
class ParallelContext:
    """Degrees, this rank's coordinates and the mesh; the one source of truth for process groups."""
    cfg: object  # collie.config.ParallelConfig
    rank: int
    world_size: int
    local_rank: int
    dp: int
    tp: int
    pp: int
    device: torch.device
    mesh: DeviceMesh | None  # None in a one-process run
    owns_process_group: bool = False
    dp_replicate: int = 1  # HSDP replicas; dp_shard = dp / dp_replicate ranks shard the state within each
    cp: int = 1  # context parallel: ranks of one replica that split each sequence

    # --- coordinates ---------------------------------------------------------------------------------------
    def _local_rank(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self._local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self._local_rank("tp")

    @property
    def pp_rank(self) -> int:
        return self._local_rank("pp")

    @property
    def cp_rank(self) -> int:
        return self._local_rank("cp")

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    # --- sub-meshes and groups (None when the world is one process) ----------------------------------------
    @property
    def dp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["dp"]

    @property
    def gradient_ranks(self) -> int:
        """Ranks that hold the same parameters and sum their gradients: dp × cp."""
        return self.dp * self.cp

    @property
    def replicate_mesh(self) -> DeviceMesh | None:
        """The mesh ZeRO-0/1 replicate over (gradient all-reduce): "dp", or "dp_cp" under context parallelism."""
        if self.mesh is None:
            return None
        return self.mesh["dp_cp"] if self.cp > 1 else self.mesh["dp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh ZeRO-2/3 shard over: "dp" (1-D, FSDP), or (dp_replicate, dp_shard) with dp_replicate > 1
        (2-D: FSDP2's HSDP, sharded within a replica and all-reduced across replicas); with cp > 1 the cp ranks
        join the shard group ("dp_cp", or (dp_replicate, dp_shard_cp))."""
        if self.mesh is None:
            return None
        if self.dp_replicate > 1:
            return self.mesh[("dp_replicate", "dp_shard_cp")] if self.cp > 1 else self.mesh[FLAT_DP]
        return self.replicate_mesh

    @property
    def cp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["cp"]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["tp"]

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        return None if self.mesh is None else self.mesh["pp"]

    @property
    def dp_group(self):
        return None if self.mesh is None else self.mesh["dp"].get_group()

    @property
    def pp_group(self):
        return None if self.mesh is None else self.mesh["pp"].get_group()

    @property
    def gradient_group(self):
        """The group of ``replicate_mesh``: dp, or dp × cp (ZeRO-1 shards optimizer state over it)."""
        return None if self.mesh is None else self.replicate_mesh.get_group()

    @property
    def loss_scale_for_dp(self) -> float:
        """Factor to multiply each rank's loss by before backward: 1.0, because every data-parallel mechanism
        collie sets up SUMS gradients over dp (FSDP2/replicate with divide factor 1, sum-only collectives).
        Divide each rank's summed token loss by the GLOBAL token count of the step (``dp_sum`` of the counts)
        and the gradient is exactly the one-process gradient of the concatenated batch."""
        return 1.0

    def dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over the data-parallel group (a new tensor; the input is left as is). The cp ranks of a
        replica hold the same batch: sum counts of whole batches with this."""
        value = value.detach().clone()
        if self.dp > 1:
            dist.all_reduce(value, group=self.dp_group)
        return value

    def cp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over the context-parallel ranks of this replica (each holds a share of every
        sequence's tokens); a new tensor."""
        value = value.detach().clone()
        if self.cp > 1:
            dist.all_reduce(value, group=self.cp_mesh.get_group())
        return value

    # --- checks --------------------------------------------------------------------------------------------
    def validate_model(self, args) -> None:
        """ConfigError when the model's shape cannot be split over this layout (before anything is built)."""
        validate_model_for_layout(args, self.cfg, self.tp, self.pp)

    def destroy(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = None


def barrier() -> None:
    """Wait for every rank of the job (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_parallel(parallel_cfg, device_type: str = "cpu") -> ParallelContext:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun), start the process group (gloo on CPU, nccl on CUDA) with the
    configured timeout, resolve ``dp=-1`` and build the mesh. Reuses a process group that is already up."""
    layout_rules.check_launch(parallel_cfg.engine, "WORLD_SIZE" in os.environ)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dp, tp, pp = resolve_degrees(parallel_cfg, world)
    cp = parallel_cfg.cp
    replicas = parallel_cfg.dp_replicate
    layout_rules.check_dp_replicate(replicas, dp, parallel_cfg.zero_stage, parallel_cfg.engine)
    layout_rules.check_context_parallel(cp, tp, pp, parallel_cfg.engine)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if world == 1:
        return ParallelContext(parallel_cfg, 0, 1, 0, 1, 1, 1, device, mesh=None)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=parallel_cfg.timeout_s)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                store=_restart_store(world, timeout))
    mesh = init_device_mesh(device.type, (pp, replicas, dp // replicas, cp, tp), mesh_dim_names=MESH_DIMS)
    mesh[FLAT_DP]._flatten("dp")  # now mesh["dp"]: the whole data-parallel group
    flat = ["dp"]
    if cp > 1:  # the ranks that sum gradients: dp × cp
        mesh[FLAT_DP_CP]._flatten("dp_cp")
        mesh[FLAT_SHARD_CP]._flatten("dp_shard_cp")
        flat += ["dp_cp", "dp_shard_cp"]
    _bound_mesh_groups(mesh, datetime.timedelta(seconds=parallel_cfg.timeout_s), flat)
    return ParallelContext(parallel_cfg, rank, world, local_rank, dp, tp, pp, device, mesh, owns, replicas, cp)


def _bound_mesh_groups(mesh: DeviceMesh, timeout: datetime.timedelta, flattened=("dp",)) -> None:
    """Give the mesh's sub-groups the job's timeout: they are created with the backend's default (30 minutes
    on gloo), not the one given to ``init_process_group``."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # the public API sets only the default group
    for dim in (*MESH_DIMS, *flattened):
        _set_pg_timeout(timeout, mesh[dim].get_group())


def _restart_store(world: int, timeout: datetime.timedelta):
    """Under torchrun's agent store, a store namespaced by the restart count: torchrun keeps one store across
    ``--max-restarts``, and a restarted gloo group would otherwise read its dead predecessors' addresses."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"collie/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def resolve_degrees(parallel_cfg, world: int) -> tuple[int, int, int]:
    """(dp, tp, pp) with ``dp=-1`` filled in; ConfigError when they do not multiply (with cp) to the world size."""
    tp, pp = parallel_cfg.tp, parallel_cfg.pp
    return layout_rules.resolve_dp(world, parallel_cfg.dp, tp, pp, parallel_cfg.cp), tp, pp


def _divisors(n: int) -> str:
    values = [str(d) for d in range(1, n + 1) if n % d == 0]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def virtual_stages(parallel_cfg) -> int:
    """Pipeline stages in total: pp, or 2·pp for the interleaved schedule (two stages per rank)."""
    return parallel_cfg.pp * (2 if parallel_cfg.pp_schedule == "interleaved_1f1b" and parallel_cfg.pp > 1 else 1)


def validate_model_for_layout(args, parallel_cfg, tp: int | None = None, pp: int | None = None) -> None:
    """The shape rules of each dimension, checked without starting any process."""
    tp = parallel_cfg.tp if tp is None else tp
    pp = parallel_cfg.pp if pp is None else pp
    if tp > args.n_kv_heads:
        raise ConfigError(f"parallel.tp={tp} exceeds num_key_value_heads={args.n_kv_heads}: key/value heads are "
                          f"sharded, not replicated; choose {_divisors(args.n_kv_heads)}")
    for name, value in (("num_attention_heads", args.num_attention_heads), ("num_key_value_heads", args.n_kv_heads),
                        ("vocab_size", args.vocab_size), ("intermediate_size", args.intermediate_size)):
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {name}={value}; choose {_divisors(value)}")
    if parallel_cfg.cp > 1 and (args.rope_scaling or {}).get("rope_type") == "longrope":
        raise ConfigError(f"parallel.cp={parallel_cfg.cp}: longrope (model.arch.rope_scaling) picks its short or long "
                          f"factors from the largest position of the whole sequence, which a cp rank does not hold; "
                          f"use parallel.cp=1 or a model without longrope scaling")
    if getattr(args, "num_experts", None):
        _check_moe_layout(args, pp, parallel_cfg.cp)
    if pp == 1:
        return
    stages = virtual_stages(parallel_cfg)
    layers = args.num_hidden_layers
    if layers < stages:
        what = f"parallel.pp={pp}" + (" with interleaved_1f1b (2 stages per rank)" if stages > pp else "")
        raise ConfigError(f"{what} needs at least {stages} decoder layers; the model has num_hidden_layers="
                          f"{layers}; choose parallel.pp ≤ {layers // (stages // pp)}")
    if args.tie_word_embeddings:
        raise ConfigError("tie_word_embeddings=true cannot be split over pipeline stages (embed_tokens is on the "
                          "first stage, lm_head on the last); use parallel.pp=1 or untie the embeddings")
    boundaries = parallel_cfg.pp_boundaries
    if boundaries is not None:
        if stages != pp:
            raise ConfigError("parallel.pp_boundaries cannot be used with pp_schedule=interleaved_1f1b (2 stages "
                              "per rank); use parallel.pp_split=uniform or balanced")
        if len(boundaries) != stages - 1:
            raise ConfigError(f"parallel.pp_boundaries has {len(boundaries)} entries; {stages} stages need "
                              f"{stages - 1} (the first layer index of each stage after the first)")
        edges = [0, *boundaries, layers]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ConfigError(f"parallel.pp_boundaries={boundaries} must be strictly increasing values in "
                              f"1..{layers - 1} so that every stage gets at least one layer")


def _check_moe_layout(args, pp: int, cp: int = 1) -> None:
    """Mixture-of-experts models: the router losses couple every layer of a forward (transformers' load-balancing
    loss), which pipeline stages split. (Under tensor parallelism the MoE blocks run replicated on every tp rank:
    ``collie.distributed.tensor_parallel``.)"""
    if cp > 1 and (args.router_aux_loss_coef or args.router_z_loss_coef):
        raise ConfigError(f"parallel.cp={cp}: the router losses of architecture {args.architecture} are statistics "
                          f"over a forward's tokens, which context parallelism splits; set "
                          f"model.arch.router_aux_loss_coef=0 and model.arch.router_z_loss_coef=0, or parallel.cp=1")
    if pp > 1 and (args.router_aux_loss_coef or args.router_z_loss_coef):
        raise ConfigError(f"parallel.pp={pp}: the router losses of architecture {args.architecture} span all "
                          f"layers, which pipeline stages split; set model.arch.router_aux_loss_coef=0 and "
                          f"model.arch.router_z_loss_coef=0, or parallel.pp=1")
