"""Search dp × tp × pp (× HSDP replicas × ZeRO stage × activation checkpointing × sequence parallel × expert
parallel × context parallel) for layouts that fit.

Every candidate is checked with collie's own layout rules (``validate_model_for_layout``, and
``collie.layout_rules``, which ``Setup`` runs as config load does), its memory estimated, and the ones that
fit ranked by a simple step-time model:

    step = compute·(1 + recompute) + bubble + tp + pp + exposed dp + offload
    compute  = FLOPs per GPU / (peak · efficiency)          FLOPs: collie.monitor.meters.flops_per_token
    recompute: +1/3 with full checkpointing (forward again), +1/(3k) with every k-th layer
    bubble   = compute · (pp − 1) / (micro-batches · stages per rank)      (Narayanan et al. 2021)
    tp, pp   = bytes sent / link bandwidth (on the critical path)
    dp       = max(0, bytes sent / bandwidth − backward compute)   (gradient sync overlaps backward)
    offload  = (parameters + gradients moved over PCIe) / PCIe bandwidth

A group uses NVLink when it fits in a node (the mesh is (pp, dp_replicate, dp_shard, cp, tp), tp innermost), else
the network. On more than one node, ZeRO-2/3 layouts are also tried as HSDP: ``dp_replicate`` replicas whose
shard group (tp·dp_shard GPUs) fits in a node, so that all-gathers and reduce-scatters stay on NVLink and only
the all-reduce of each rank's gradient shard crosses nodes (``dp_replicate`` in the sent bytes). It ranks
layouts; it does not predict throughput to better than a factor of about 1.5.

Mixture-of-experts models: every ep that divides dp and num_experts is tried (the rules allowing); the FLOPs are
those of the active parameters, and the all-to-alls are on the critical path. Context parallelism is proposed only
where it is needed: layouts of a tp × pp with cp > 1 are tried only when no layout of that tp × pp fits with a
smaller cp (its ranks given to dp), i.e. the smallest cp that fits; its k/v all-gathers are on the critical path.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

from collie.errors import ConfigError
from collie.layout_rules import check_context_parallel
from collie.estimate.communication import estimate_communication
from collie.estimate.memory import MemoryEstimate, estimate_memory
from collie.estimate.setup import Setup
from collie.estimate.shapes import active_params
from collie.models.args import ModelArgs
from collie.monitor.meters import flops_per_token


@dataclass(frozen=True)
class Hardware:
    """Per-GPU figures of the cluster (defaults: H100 SXM, 8 per node, NVLink 4, one 400 Gb/s NIC per GPU)."""
    peak_tflops: float = 989.0
    efficiency: float = 0.5  # fraction of peak the matmuls reach
    nvlink_gbps: float = 360.0  # achievable NCCL bus bandwidth inside a node, GB/s
    network_gbps: float = 40.0  # between nodes, per GPU, GB/s
    pcie_gbps: float = 25.0  # host <-> device, GB/s
    gpus_per_node: int = 8


@dataclass
class PlanRow:
    setup: Setup
    memory: MemoryEstimate
    comm_gb: dict[str, float]  # GB this rank sends per step, by dimension
    step_s: float
    tokens_per_s_per_gpu: float

    def to_dict(self) -> dict:
        s = self.setup
        return {"dp": s.dp, "dp_replicate": s.dp_replicate, "tp": s.tp, "pp": s.pp, "cp": s.cp, "ep": s.ep,
                "zero_stage": s.zero_stage,
                "cpu_offload": s.cpu_offload,
                "activation_checkpointing": s.activation_checkpointing, "sequence_parallel": s.sequence_parallel,
                "pp_schedule": s.pp_schedule, "pp_microbatches": s.n_microbatches,
                "micro_batch_size": s.micro_batch_size, "grad_accum_steps": s.grad_accum_steps,
                "peak_gib": round(self.memory.peak_gib, 2), "reserved_gib": round(self.memory.reserved_gib, 2),
                "comm_gb_per_step": {k: round(v, 3) for k, v in self.comm_gb.items()},
                "step_s": round(self.step_s, 3), "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1)}


def plan(args: ModelArgs, num_gpus: int, gpu_mem_gib: float, base: Setup | None = None,
         global_batch: int | None = None, zero_stages=(0, 1, 2, 3), checkpointing=("none", "selective", "full"),
         offload: bool = False, hardware: Hardware | None = None, keep: str = "best") -> list[PlanRow]:
    """Layouts of ``num_gpus`` GPUs that fit ``gpu_mem_gib`` (reserved memory), fastest first.

    ``base`` gives the recipe (optimizer, dtypes, seq_len, PEFT, micro_batch_size = sequences per pipeline
    micro-batch); ``global_batch`` sequences per optimizer step (default: 4 per GPU). ``keep="best"`` keeps the
    best row per (dp, dp_replicate, tp, pp, cp, ep); ``"all"`` every fitting candidate."""
    base = base or Setup()
    hardware = hardware or Hardware()
    global_batch = global_batch or 4 * num_gpus
    candidates = _candidates(args, num_gpus, base, global_batch, zero_stages, checkpointing, offload,
                             hardware.gpus_per_node)
    rows, fitting_cp = [], {}  # (tp, pp) -> the smallest cp at which some layout of them fits
    for setup in candidates:  # cp ascending
        if fitting_cp.get((setup.tp, setup.pp), setup.cp) < setup.cp:
            continue  # fits without splitting the sequence further
        if (row := _evaluate(args, setup, gpu_mem_gib, hardware)) is not None:
            rows.append(row)
            fitting_cp[setup.tp, setup.pp] = setup.cp
    rows.sort(key=lambda r: -r.tokens_per_s_per_gpu)
    if keep == "best":
        seen, best = set(), []
        for row in rows:
            s = row.setup
            key = (s.dp, s.dp_replicate, s.tp, s.pp, s.cp, s.ep)
            if key not in seen:
                seen.add(key)
                best.append(row)
        rows = best
    return rows


def _candidates(args, num_gpus, base, global_batch, zero_stages, checkpointing, offload, gpus_per_node):
    for cp, tp, pp in itertools.product(_divisors(num_gpus), repeat=3):  # cp outermost: see plan()
        if num_gpus % (tp * pp * cp):
            continue
        dp = num_gpus // (tp * pp * cp)
        if global_batch % dp or not _cp_composes(base, tp, pp, cp) or not _layout_ok(args, base, tp, pp, cp):
            continue
        batch = _batching(base, pp, global_batch // dp)
        if batch is None:
            continue
        boundaries = base.pp_boundaries if pp == base.pp else None  # the job's split fits only its own pp
        replicas = _replica_choices(num_gpus, dp, tp * cp, gpus_per_node)
        experts = [ep for ep in _divisors(dp) if args.num_experts and args.num_experts % ep == 0] or [1]
        for zero, replicate, ckpt, sp, off, ep in itertools.product(zero_stages, replicas, checkpointing,
                                                                    (False, True), (False, True), experts):
            if (zero > 0 and dp * cp == 1) or (off and not offload) or (replicate > 1 and zero < 2):  # search space
                continue
            try:  # Setup.check runs collie's layout rules (collie.layout_rules), as config load does
                setup = base.replace(dp=dp, dp_replicate=replicate, tp=tp, pp=pp, cp=cp, ep=ep, zero_stage=zero,
                                     activation_checkpointing=ckpt, sequence_parallel=sp, cpu_offload=off,
                                     pp_boundaries=boundaries, **batch)
                setup.check_model(args)
            except ConfigError:
                continue
            yield setup


def _cp_composes(base: Setup, tp: int, pp: int, cp: int) -> bool:
    """collie's rule for cp with the other dimensions, checked once per (tp, pp, cp) rather than per candidate."""
    try:
        check_context_parallel(cp, tp, pp, base.engine, base.peft)
    except ConfigError:
        return False
    return True


def _replica_choices(num_gpus: int, dp: int, tp: int, gpus_per_node: int) -> list[int]:
    """HSDP replica counts worth trying: 1 (shard over all of dp), and on more than one node each count whose
    shard group (tp · dp/replicas GPUs, at least 2 ranks) fits in a node."""
    if num_gpus <= gpus_per_node:
        return [1]
    return [1] + [r for r in _divisors(dp) if 1 < r < dp and tp * (dp // r) <= gpus_per_node]


def _batching(base: Setup, pp: int, per_replica: int) -> dict | None:
    """Micro-batching of a replica's ``per_replica`` sequences: pipeline micro-batches of
    ``base.micro_batch_size`` sequences, up to 4·pp of them per pipeline step, the rest by accumulation."""
    mbs = base.micro_batch_size
    if per_replica % mbs:
        return None
    chunks = per_replica // mbs
    if pp == 1:
        return {"micro_batch_size": mbs, "grad_accum_steps": chunks, "pp_microbatches": None}
    n = max(d for d in _divisors(chunks) if d <= 4 * pp)  # a schedule that cannot run n: Setup refuses it
    return {"micro_batch_size": mbs * n, "grad_accum_steps": chunks // n, "pp_microbatches": n}


def _layout_ok(args: ModelArgs, base: Setup, tp: int, pp: int, cp: int = 1) -> bool:
    from collie.distributed.mesh import validate_model_for_layout
    cfg = SimpleNamespace(tp=tp, pp=pp, cp=cp, ep=1, pp_schedule=base.pp_schedule, pp_boundaries=None)
    try:
        validate_model_for_layout(args, cfg, tp, pp)
    except ConfigError:
        return False
    return True


def _evaluate(args: ModelArgs, setup: Setup, gpu_mem_gib: float, hw: Hardware) -> PlanRow | None:
    memory = estimate_memory(args, setup)
    if not memory.fits(gpu_mem_gib):
        return None
    comm = estimate_communication(args, setup)
    step = step_seconds(args, setup, comm.wire, hw)
    tokens = comm.tokens_per_step * setup.dp / setup.world_size
    return PlanRow(setup, memory, {k: v / 1e9 for k, v in comm.wire.items()}, step, tokens / step)


def step_seconds(args: ModelArgs, setup: Setup, wire: dict[str, float], hw: Hardware) -> float:
    """The step-time model of the module docstring."""
    tokens = setup.micro_batch_size * setup.seq_len * setup.grad_accum_steps * setup.dp
    flops = flops_per_token(active_params(args), args.num_hidden_layers, args.hidden_size, setup.seq_len) * tokens
    compute = flops / setup.world_size / (hw.peak_tflops * 1e12 * hw.efficiency)
    compute *= 1 + _recompute_fraction(setup)
    bubble = compute * (setup.pp - 1) / (setup.n_microbatches * setup.stages_per_rank) if setup.pp > 1 else 0.0
    seconds = compute + bubble
    for dim in ("tp", "pp", "cp", "ep"):  # on the critical path
        seconds += wire.get(dim, 0.0) / (_bandwidth(setup, dim, hw) * 1e9)
    dp_time = sum(wire.get(dim, 0.0) / (_bandwidth(setup, dim, hw) * 1e9)
                  for dim in ("dp", "dp_replicate", "ep_replicate"))
    seconds += max(0.0, dp_time - 2 / 3 * compute)
    if setup.cpu_offload:
        moved = 2 * args.num_params() / setup.world_size * setup.param_bytes * setup.grad_accum_steps
        seconds += moved / (hw.pcie_gbps * 1e9)
    return seconds


def _recompute_fraction(setup: Setup) -> float:
    if setup.activation_checkpointing == "full":
        return 1 / 3
    if setup.activation_checkpointing == "selective":
        return 1 / (3 * setup.checkpoint_every)
    if setup.activation_checkpointing == "attention":  # q/k/v/o are ~1/3 of a Llama layer's weights
        return 1 / 9
    return 0.0


def _bandwidth(setup: Setup, dim: str, hw: Hardware) -> float:
    """NVLink when the dimension's groups stay inside a node (mesh order pp, dp_replicate, dp_shard, cp, tp), else
    the network. "dp" is the shard group (all of dp without HSDP, × cp), "dp_replicate" the replicas; the ep ranks
    are neighbouring dp ranks, "ep_replicate" (the ranks holding the same experts) spans dp."""
    inner = setup.tp * setup.cp
    span = {"tp": setup.tp, "cp": inner, "dp": inner * setup.dp_shard, "dp_replicate": inner * setup.dp,
            "ep": inner * setup.ep, "ep_replicate": inner * setup.dp, "pp": setup.world_size}[dim]
    return hw.nvlink_gbps if span <= hw.gpus_per_node else hw.network_gbps


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
