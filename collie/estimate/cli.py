"""``collie estimate``: memory and communication of a job, or a plan of layouts that fit.

    collie estimate configs/my_job.yaml parallel.zero_stage=3 --gpus 16     # exactly what `collie train` runs
    collie estimate --card llama2-7b --dp 8 --zero 1 --dtype bfloat16 --mbs 4 --seq 2048 --ckpt full
    collie estimate --card llama2-70b --plan --gpus 64 --gpu-mem 80 --seq 4096 --dtype bfloat16
    collie estimate --card llama2-7b --dp 16 --dp-replicate 2 --zero 3 --dtype bfloat16   # HSDP: 2 nodes × 8
    collie estimate --card mixtral-8x7b --dp 8 --ep 8 --zero 3 --dtype bfloat16         # experts over 8 ranks
    collie estimate --card llama3-8b --dp 2 --cp 4 --zero 3 --seq 65536 --ckpt full      # 65k tokens over 4 ranks
    ... --json                                                              # machine-readable

Flags given explicitly override the job config (after its dotted overrides).
"""
from __future__ import annotations

import argparse
import json
import sys

from collie.errors import CollieError, ConfigError
from collie.estimate.communication import CommEstimate, estimate_communication
from collie.estimate.memory import ALLOCATOR_OVERHEAD, RUNTIME_OVERHEAD_GIB, MemoryEstimate, estimate_memory
from collie.estimate.plan import Hardware, PlanRow, plan
from collie.estimate.setup import Setup
from collie.estimate.shapes import active_params

# --flag: (Setup field, type, help). Flags default to None so that only the given ones override a config.
FLAGS = {
    "dp": ("dp", int, "data-parallel degree (parallel.dp)"),
    "dp_replicate": ("dp_replicate", int, "HSDP: replicas of dp/dp_replicate ranks that shard the state (ZeRO "
                                         "2/3), all-reduced across replicas (parallel.dp_replicate)"),
    "tp": ("tp", int, "tensor-parallel degree (parallel.tp)"),
    "pp": ("pp", int, "pipeline-parallel degree (parallel.pp)"),
    "cp": ("cp", int, "context-parallel degree: each sequence split over cp ranks, k/v all-gathered per layer "
                      "(parallel.cp)"),
    "ep": ("ep", int, "expert-parallel degree (MoE): the routed experts split over ep of the dp ranks, tokens "
                      "sent to them by all-to-all (parallel.ep)"),
    "zero": ("zero_stage", int, "ZeRO stage 0-3 (parallel.zero_stage)"),
    "cpu_offload": ("cpu_offload", bool, "offload parameters, gradients and optimizer state to the host "
                                         "(ZeRO 2/3; parallel.cpu_offload)"),
    "sp": ("sequence_parallel", bool, "sequence parallelism with tp (parallel.sequence_parallel)"),
    "schedule": ("pp_schedule", str, "pipeline schedule: gpipe, 1f1b or interleaved_1f1b (parallel.pp_schedule)"),
    "microbatches": ("pp_microbatches", int, "pipeline micro-batches per forward (parallel.pp_microbatches; "
                                             "default 2·pp)"),
    "optimizer": ("optimizer", str, "adamw, lion, adan, sophia, lomo or adalomo (optim.name)"),
    "clip_grad_norm": ("clip_grad_norm", float, "gradient clipping norm; > 0 adds a norm pass to LOMO/AdaLomo "
                                                "(optim.clip_grad_norm)"),
    "master_weights": ("master_weights", bool, "fp32 master weights and fp32 optimizer state for 16-bit "
                                               "parameters (the DeepSpeed engine's recipe)"),
    "peft": ("peft", str, "none or lora (peft.method)"),
    "lora_r": ("lora_r", int, "LoRA rank (peft.r)"),
    "lora_targets": ("lora_targets", lambda names: tuple(names.split(",")),
                     "comma-separated linears LoRA adapts, by last name component (peft.target_modules; "
                     "default q_proj,v_proj)"),
    "lora_experts": ("lora_experts", bool, "LoRA on the routed experts' target linears too (peft.lora_experts)"),
    "dtype": ("param_dtype", str, "parameter dtype: float32, bfloat16 or float16 (model.dtype)"),
    "precision": ("precision", str, "compute precision: fp32, bf16 or fp16 autocast (train.precision)"),
    "ckpt": ("activation_checkpointing", str, "activation checkpointing: none, full, selective or attention "
                                              "(model.activation_checkpointing)"),
    "mbs": ("micro_batch_size", int, "sequences per forward per data-parallel rank (train.micro_batch_size)"),
    "seq": ("seq_len", int, "tokens per sequence (data.seq_len)"),
    "grad_accum": ("grad_accum_steps", int, "micro-batches accumulated per optimizer step "
                                            "(train.grad_accum_steps)"),
}
FLAG_FIELDS = {flag: field for flag, (field, _, _) in FLAGS.items()}
METAVARS = {int: "N", float: "X", str: "NAME"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collie estimate", description="Estimate per-GPU memory and "
                                     "communication of a training job, or plan layouts that fit. The layout "
                                     "and recipe flags override the job config (after its dotted overrides).")
    parser.add_argument("config", nargs="?", help="job config (YAML), as for collie train")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    parser.add_argument("--card", metavar="NAME", help="model card name or YAML path (instead of a job config)")
    parser.add_argument("--gpus", type=int, metavar="N",
                        help="GPUs of the job (resolves parallel.dp=-1; the plan's total)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB",
                        help="GPU memory in GiB that decides 'fits' (default 80)")
    parser.add_argument("--plan", action="store_true", help="list the layouts of --gpus GPUs that fit")
    parser.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node, metavar="N",
                        help=f"plan: GPUs per node; groups within a node use NVLink, and on more than one node "
                             f"ZeRO-2/3 are also tried as HSDP with a shard group inside a node "
                             f"(default {Hardware.gpus_per_node})")
    parser.add_argument("--global-batch", type=int, metavar="N",
                        help="plan: sequences per optimizer step (default 4/GPU)")
    parser.add_argument("--all", action="store_true", help="plan: every fitting candidate, not the best per "
                                                           "dp×tp×pp")
    parser.add_argument("--offload", action="store_true", help="plan: also consider CPU offload")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    layout = parser.add_argument_group("layout and recipe (override the job config)")
    for flag, (_, kind, text) in FLAGS.items():
        name = f"--{flag.replace('_', '-')}"
        if kind is bool:
            layout.add_argument(name, dest=flag, action="store_const", const=True, help=text)
        else:
            layout.add_argument(name, dest=flag, type=kind, help=text, metavar=METAVARS.get(kind, "NAMES"))
    return parser


def estimate_main(argv=None) -> int:
    """Entry point of ``collie estimate`` and ``python -m collie.estimate`` (returns the exit code)."""
    from collie.cli import quiet_on_broken_pipe
    return quiet_on_broken_pipe(_estimate, argv)


def _estimate(argv) -> int:
    options = build_parser().parse_intermixed_args(argv)  # flags and overrides in any order
    try:
        args, setup, label = _job(options)
        if options.plan:
            return _print_plan(options, args, setup, label)
        memory = estimate_memory(args, setup)
        comm = estimate_communication(args, setup, pp_rank=memory.pp_rank)
    except CollieError as error:
        print(f"collie estimate: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps({"model": label, "params": args.num_params(), "active_params": active_params(args),
                          "setup": _setup_dict(setup),
                          "gpu_mem_gib": options.gpu_mem, "fits": memory.fits(options.gpu_mem),
                          "memory": memory.to_dict(), "communication": comm.to_dict()}, indent=2))
    else:
        print(render_estimate(label, _params(args), memory, comm, options.gpu_mem))
    return 0


def _job(options) -> tuple:
    """(ModelArgs, Setup, label) from the job config or --card, with explicit flags applied."""
    flags = {FLAG_FIELDS[k]: v for k, v in vars(options).items() if k in FLAG_FIELDS and v is not None}
    if options.config:
        from collie.config import CollieConfig
        from collie.builders import build_model_args
        cfg = CollieConfig.load(options.config, options.overrides)
        args, label = build_model_args(cfg.model), cfg.model.pretrained or cfg.model.card
        setup = Setup.from_config(cfg, options.gpus)
    elif options.card:
        from collie.models import load_card
        if options.overrides:
            raise ConfigError(f"dotted overrides {options.overrides} need a job config; with --card use flags")
        args, label, setup = load_card(options.card), options.card, Setup()
    else:
        raise ConfigError("give a job config (collie estimate job.yaml) or a model card (--card llama2-7b)")
    if flags:
        setup = setup.replace(**flags)
    other = setup.tp * setup.pp * setup.cp
    if options.config and cfg.parallel.dp == -1 and "dp" not in flags and options.gpus:
        setup = setup.replace(dp=max(1, options.gpus // other))  # re-resolve after --tp/--pp/--cp
    if options.gpus and not options.plan and setup.world_size != options.gpus:
        cp = f" × cp {setup.cp}" if setup.cp > 1 else ""
        raise ConfigError(f"--gpus {options.gpus} ≠ dp {setup.dp} × tp {setup.tp} × pp {setup.pp}{cp}; "
                          f"set --dp {options.gpus // other} or drop --gpus")
    setup.check_model(args)
    return args, setup, label


def _print_plan(options, args, setup: Setup, label: str) -> int:
    if not options.gpus:
        raise ConfigError("--plan needs --gpus N (the GPUs to spread the job over)")
    rows = plan(args, options.gpus, options.gpu_mem, base=setup, global_batch=options.global_batch,
                offload=options.offload, keep="all" if options.all else "best",
                hardware=Hardware(gpus_per_node=options.gpus_per_node))
    if options.json:
        print(json.dumps({"model": label, "gpus": options.gpus, "gpu_mem_gib": options.gpu_mem,
                          "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(render_plan(label, _params(args), options.gpus, options.gpu_mem, setup, rows))
    return 0 if rows else 1


# --- tables ------------------------------------------------------------------------------------------------

def _setup_dict(setup: Setup) -> dict:
    from dataclasses import asdict
    return asdict(setup)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _params(args) -> str:
    """The parameter count, and for a mixture of experts the active ones (what one token passes through)."""
    active = active_params(args)
    return _count(args.num_params()) + (f", {_count(active)} active" if active != args.num_params() else "")


def describe(setup: Setup) -> str:
    s = setup
    hsdp = f" ({s.dp_replicate} replicas × {s.dp_shard} shards)" if s.dp_replicate > 1 else ""
    extra = "".join(f" {name}={value}" for name, value in (("cp", s.cp), ("ep", s.ep)) if value > 1)
    parts = [f"dp={s.dp}{hsdp} tp={s.tp} pp={s.pp}{extra}",
             f"ZeRO-{s.zero_stage}" + (" +offload" if s.cpu_offload else ""),
             s.optimizer + (f"+lora(r={s.lora_r}{', experts' if s.lora_experts else ''})" if s.peft == "lora" else ""),
             f"{s.param_dtype} params, {s.compute_dtype} compute", f"checkpointing={s.activation_checkpointing}",
             f"{s.micro_batch_size}×{s.seq_len} tokens per forward"]
    if s.sequence_parallel:
        parts.append("sequence parallel")
    if s.pp > 1:
        parts.append(f"{s.pp_schedule} with {s.n_microbatches} micro-batches")
    if s.grad_accum_steps > 1:
        parts.append(f"grad_accum={s.grad_accum_steps}")
    return ", ".join(parts)


def render_estimate(label: str, params: str, memory: MemoryEstimate, comm: CommEstimate,
                    gpu_mem_gib: float) -> str:
    lines = [f"{label} ({params} parameters): {describe(memory.setup)}", "",
             f"Memory per GPU (pipeline rank {memory.pp_rank}, peak during {memory.phase}):"]
    lines += [f"  {name:<20}{gib:>9.2f} GiB" for name, gib in memory.breakdown.items()]
    fits = "fits" if memory.fits(gpu_mem_gib) else "does NOT fit"
    lines += [f"  {'peak allocated':<20}{memory.peak_gib:>9.2f} GiB   (torch.cuda.max_memory_allocated)",
              f"  {'reserved':<20}{memory.reserved_gib:>9.2f} GiB   (+{ALLOCATOR_OVERHEAD:.0%} allocator, "
              f"+{RUNTIME_OVERHEAD_GIB} GiB CUDA/NCCL runtime): {fits} in {gpu_mem_gib:g} GiB",
              "  phases: " + ", ".join(f"{k} {v:.1f}" for k, v in memory.phases.items()) + " GiB"]
    if memory.setup.pp > 1:
        lines.append("  per pipeline rank: " + ", ".join(f"{v:.1f}" for v in memory.per_rank_gib) + " GiB")
    if memory.host_gib:
        lines.append(f"  host (CPU) memory per rank: {memory.host_gib:.2f} GiB")
    lines += ["", f"Communication per optimizer step (pipeline rank {comm.pp_rank}, "
                  f"{comm.tokens_per_step} tokens per replica):",
              f"  {'dim':<13}{'collective':<16}{'payload GB':>12}"]
    lines += [f"  {dim:<13}{kind:<16}{payload / 1e9:>12.3f}" for (dim, kind), payload in sorted(comm.payload.items())]
    sent = ", ".join(f"{d} {v / 1e9:.3f} GB" for d, v in sorted(comm.wire.items())) or "none"
    lines.append(f"  sent by this rank (ring algorithms): {sent}; {comm.wire_per_token() / 1024:.1f} KiB per token")
    if comm.approximate:
        lines.append(f"  approximate (upper bound): {', '.join(comm.approximate)}")
    return "\n".join(lines)


def render_plan(label: str, params: str, gpus: int, gpu_mem_gib: float, base: Setup,
                rows: list[PlanRow]) -> str:
    """The plan as a table; cp and ep get columns when a row uses them (sent bytes: tp/dp/pp, then cp, ep)."""
    head = (f"{label} ({params}) on {gpus} GPUs of {gpu_mem_gib:g} GiB, seq {base.seq_len}, "
            f"{base.optimizer}, {base.param_dtype} params / {base.compute_dtype} compute: "
            f"{len(rows)} layouts fit (fastest first; est. = the plan's step-time model)")
    extra = [dim for dim in ("cp", "ep") if any(getattr(r.setup, dim) > 1 for r in rows)]
    sent = "/".join(["tp", "dp", "pp", *extra])
    columns = "| dp | tp | pp | " + "".join(f"{dim} | " for dim in extra) + "ZeRO | ckpt | SP | " \
              f"micro-batches (n×seqs, accum) | peak GiB | reserved GiB | sent GB/step ({sent}) | est. tok/s/GPU |"
    table = [head, "", columns, "|" + "---|" * (11 + len(extra))]
    for r in rows:
        s, c = r.setup, r.comm_gb
        dp = f"{s.dp_replicate}×{s.dp_shard}" if s.dp_replicate > 1 else str(s.dp)
        sent_dp = f"{c.get('dp', 0):.0f}" + "".join(f"+{c[d]:.0f}" for d in ("dp_replicate", "ep_replicate") if d in c)
        dims = "".join(f"{getattr(s, dim)} | " for dim in extra)
        sent_extra = "".join(f"/{c.get(dim, 0):.0f}" for dim in extra)
        table.append(f"| {dp} | {s.tp} | {s.pp} | {dims}{s.zero_stage}{'+off' if s.cpu_offload else ''} | "
                     f"{s.activation_checkpointing} | {'yes' if s.sequence_parallel else 'no'} | "
                     f"{s.n_microbatches}×{s.micro_batch_size // s.n_microbatches}, {s.grad_accum_steps} | "
                     f"{r.memory.peak_gib:.1f} | {r.memory.reserved_gib:.1f} | "
                     f"{c.get('tp', 0):.0f}/{sent_dp}/{c.get('pp', 0):.0f}{sent_extra} | "
                     f"{r.tokens_per_s_per_gpu:.0f} |")
    if "cp" in extra:
        table += ["", f"cp > 1: those tp × pp fit no layout with a smaller cp at seq {base.seq_len}; context "
                      f"parallelism splits each sequence over cp ranks (dp = the rest)."]
    return "\n".join(table)
