"""One rank of the distributed estimate checks (tests/test_estimate.py launches two on gloo, and four for HSDP).

Communication scenarios: build a tiny Llama in a layout, run one warm-up step (lazy initialisation, pipeline
shape inference), then count the collectives of one training step with ``count_collective_bytes`` and report
them with this rank's coordinates; the scenarios not named "collie_*" need nothing from ``collie.distributed``
(a hand-written gradient all-reduce, torch DDP, a DTensor colwise/rowwise MLP, LOMO's per-gradient
all-reduce). Memory scenarios ("memory_*"): the peak bytes of one step (after a warm-up step) from the
profiler's allocation events, plus the resident local parameters and optimizer state.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from collie.distributed.launch import write_rank_result
from collie.estimate.counting import count_collective_bytes
from collie.models import ModelArgs, build_model
from collie.loss import causal_lm_loss_sum

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")
BATCH, SEQ = 4, 16
ARGS = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)

# name -> collie ParallelConfig fields (+ "precision": autocast dtype, "grad_accum": micro-batches per step)
COLLIE_LAYOUTS = {
    "collie_dp2": {"dp": 2},
    "collie_dp2_ga2": {"dp": 2, "grad_accum": 2},
    "collie_zero1": {"dp": 2, "zero_stage": 1},
    "collie_zero2": {"dp": 2, "zero_stage": 2},
    "collie_zero2_ga2": {"dp": 2, "zero_stage": 2, "grad_accum": 2},
    "collie_zero3": {"dp": 2, "zero_stage": 3},
    "collie_tp2": {"tp": 2},
    "collie_tp2_sp": {"tp": 2, "sequence_parallel": True},
    "collie_tp2_sp_autocast": {"tp": 2, "sequence_parallel": True, "precision": "bf16"},
    "collie_pp2_1f1b": {"pp": 2, "pp_microbatches": 2},
    "collie_pp2_gpipe": {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4},
    "collie_pp2_interleaved": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 4},
    "collie_cp2": {"cp": 2},
    "collie_cp2_zero2": {"cp": 2, "zero_stage": 2},
    "collie_ep2": {"dp": 2, "ep": 2, "moe": True},
    "collie_ep2_zero3": {"dp": 2, "ep": 2, "zero_stage": 3, "moe": True},
    "collie_tp2_moe": {"tp": 2, "moe": True},
    "collie_tp2_sp_moe_autocast": {"tp": 2, "sequence_parallel": True, "precision": "bf16", "moe": True},
    # 4 ranks: HSDP, 2 replicas × 2 shards; dp × cp; two replicas of each expert
    "collie_hsdp_zero2": {"dp": 4, "dp_replicate": 2, "zero_stage": 2},
    "collie_hsdp_zero3": {"dp": 4, "dp_replicate": 2, "zero_stage": 3},
    "collie_dp2_cp2_zero3": {"dp": 2, "cp": 2, "zero_stage": 3},
    "collie_dp4_ep2_zero1": {"dp": 4, "ep": 2, "zero_stage": 1, "moe": True},
}
HARNESS_KEYS = ("precision", "grad_accum", "moe")
# the "moe" layouts: a Mixtral of the same size, 4 experts, each token routed to 2
MOE_ARGS = {**ARGS, "architecture": "mixtral", "num_experts": 4, "num_experts_per_tok": 2}


def batch(seed: int = 0):
    ids = torch.randint(0, ARGS["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


def world_groups() -> dict:
    return {"dp": dist.group.WORLD}


def counted(step, groups, warmup: int = 1) -> dict:
    """Run ``step`` ``warmup`` times, then once more under the counter; the counter's summary."""
    for _ in range(warmup):
        step()
    with count_collective_bytes(groups) as counter:
        step()
    # a one-rank group moves nothing (FSDP2's replicate still calls it: the experts of dp=ep)
    counter.records = [r for r in counter.records if r.group_size > 1]
    return {"payload": {f"{g}/{k}": v for (g, k), v in counter.payload_bytes().items()},
            "control_calls": sum(1 for r in counter.records if r.is_control)}


# --- without collie.distributed --------------------------------------------------------------------------

def manual_allreduce() -> dict:
    """DDP by hand: all-reduce every gradient after backward."""
    model = build_model(ModelArgs(**ARGS), device="cpu", seed=0)
    ids, labels = batch(dist.get_rank())

    def step():
        causal_lm_loss_sum(model(ids), labels).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        model.zero_grad(set_to_none=True)
    return counted(step, world_groups())


def torch_ddp() -> dict:
    """torch DDP: bucketed gradient all-reduce, plus a broadcast of the module buffers every forward (control
    traffic here: 8 floats of rotary inv_freq). Two warm-up steps: DDP rebuilds its buckets in the second
    (broadcasting the new bucket layout), a one-time overhead excluded like the initial parameter broadcast."""
    model = build_model(ModelArgs(**ARGS), device="cpu", seed=0)
    model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.1)
    ids, labels = batch(dist.get_rank())

    def step():
        causal_lm_loss_sum(model(ids), labels).backward()
        model.zero_grad(set_to_none=True)
    return counted(step, world_groups(), warmup=2)


def dtensor_mlp() -> dict:
    """The SwiGLU MLP with gate/up column-parallel and down row-parallel over 2 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from collie.models.components import MLP
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mlp = parallelize_module(MLP(ModelArgs(**ARGS)), mesh, {"gate_proj": ColwiseParallel(),
                                                           "up_proj": ColwiseParallel(),
                                                           "down_proj": RowwiseParallel()})
    x = torch.randn(BATCH, SEQ, ARGS["hidden_size"], requires_grad=True, generator=torch.Generator().manual_seed(0))

    def step():
        mlp(x).sum().backward()
    return counted(step, {"tp": mesh.get_group()})


def lomo_dp2_clip() -> dict:
    """LOMO with clip_grad_norm: a norm backward then an update backward, each all-reducing every gradient."""
    from collie.optim import Lomo
    model = build_model(ModelArgs(**ARGS), device="cpu", seed=0)
    optimizer = Lomo(model.parameters(), lr=1e-3, clip_grad_norm=1.0)
    optimizer.setup_training(dp_group=dist.group.WORLD, grad_reduce="sum")
    ids, labels = batch(dist.get_rank())

    def step():
        optimizer.backward(causal_lm_loss_sum(model(ids), labels) / ids.numel())
        optimizer.step()
    return counted(step, world_groups())


# --- collie.distributed layouts --------------------------------------------------------------------------

def collie_engine(layout: dict, arch: dict, micro_batch_size: int, seq_len: int, optim_args: dict | None = None):
    """(ctx, engine) of collie for a layout, as ``build_engine`` makes it for a job: configs/quickstart.yaml with
    the model ``arch``, AdamW (``optim_args``) without clipping, and the layout's keys."""
    import dataclasses
    import json

    from collie.builders import build_model_args
    from collie.config import CollieConfig
    from collie.distributed import init_parallel
    from collie.engine import build_engine
    accum = layout.get("grad_accum", 1)
    overrides = {**{f"parallel.{k}": v for k, v in {"timeout_s": 60, **layout}.items() if k not in HARNESS_KEYS},
                 "model.arch": dataclasses.asdict(ModelArgs(**arch)), "optim.name": "adamw", "optim.lr": 1e-3,
                 "optim.weight_decay": 0.0, "optim.clip_grad_norm": 0.0, "optim.args": optim_args or {},
                 "train.seed": 0, "train.device": "cpu", "train.precision": layout.get("precision", "fp32"),
                 "train.micro_batch_size": micro_batch_size // accum, "train.grad_accum_steps": accum,
                 "data.seq_len": seq_len, "eval.batch_size": micro_batch_size}
    cfg = CollieConfig.load(QUICKSTART, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    ctx = init_parallel(cfg.parallel, "cpu")
    return ctx, build_engine(cfg, ctx, build_model_args(cfg.model))


def engine_step(engine, ctx, ids, labels, accum: int = 1) -> None:
    """One optimizer step of the engine over ``accum`` micro-batches, as the Trainer's ``train_fn`` runs it (the
    loss normalised by this rank's token count: the denominator's own collective is left out of the count)."""
    micro = [{"input_ids": i, "labels": t, "attention_mask": torch.ones_like(i)}
             for i, t in zip(ids.chunk(accum), labels.chunk(accum))]
    denominator = torch.tensor(float(ids.numel()))
    engine.begin_step(len(micro))
    loss = sum(engine.forward_backward(mb, denominator, last=i == len(micro) - 1) for i, mb in enumerate(micro))
    engine.optimizer_step(ctx.dp_sum(loss))


def collie_layout(layout: dict) -> dict:
    ctx, engine = collie_engine(layout, MOE_ARGS if layout.get("moe") else ARGS, BATCH, SEQ)
    ids, labels = batch(ctx.dp_rank)
    # "dp": the group ZeRO shards over (under HSDP one replica's ranks; dp × cp under cp), "dp_replicate": across
    # replicas; "ep": the ranks exchanging tokens, "ep_replicate": the ranks holding the same experts
    shard_group = ctx.mesh["dp_shard"].get_group() if ctx.dp_replicate > 1 else ctx.gradient_group
    groups = {"dp": shard_group, "dp_replicate": ctx.mesh["dp_replicate"].get_group(),
              "tp": ctx.tp_mesh.get_group(), "pp": ctx.pp_group, "cp": ctx.cp_mesh.get_group()}
    sizes = {"dp": ctx.dp_shard * ctx.cp, "dp_replicate": ctx.dp_replicate, "tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp}
    experts = engine.model.expert_parallel
    if experts is not None:
        groups.update(ep=experts.group, ep_replicate=experts.replicate_mesh.get_group())
        sizes.update(ep=experts.ep, ep_replicate=experts.replicate_mesh.size())
    groups = {name: group for name, group in groups.items() if sizes[name] > 1}
    result = counted(lambda: engine_step(engine, ctx, ids, labels, layout.get("grad_accum", 1)), groups)
    result["pp_rank"] = ctx.pp_rank
    return result


# name -> layout of a memory scenario (a larger model so that activations matter)
MEMORY_LAYOUTS = {"memory_dp2": {"dp": 2}, "memory_zero2": {"dp": 2, "zero_stage": 2},
                  "memory_zero3": {"dp": 2, "zero_stage": 3}, "memory_tp2": {"tp": 2},
                  "memory_tp2_sp": {"tp": 2, "sequence_parallel": True},
                  "memory_pp2_1f1b": {"pp": 2, "pp_microbatches": 2},
                  "memory_pp2_gpipe": {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4},
                  "memory_hsdp_zero3": {"dp": 4, "dp_replicate": 2, "zero_stage": 3}}
MEMORY_ARGS = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=512)
MEMORY_BATCH, MEMORY_SEQ = 4, 64


def collie_memory(layout: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile
    # fused AdamW (collie's default on CUDA): no per-step foreach temporaries to speak of
    ctx, engine = collie_engine(layout, MEMORY_ARGS, MEMORY_BATCH, MEMORY_SEQ, optim_args={"fused": True})
    ids = torch.randint(0, MEMORY_ARGS["vocab_size"], (MEMORY_BATCH, MEMORY_SEQ),
                        generator=torch.Generator().manual_seed(0))

    def step():
        engine_step(engine, ctx, ids, ids)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in engine.parameters()]
    local += [t.to_local() if hasattr(t, "to_local") else t for s in engine.optimizer.state.values()
              for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"peak_bytes": peak + sum(t.numel() * t.element_size() for t in local), "pp_rank": ctx.pp_rank}


SCENARIOS = {"manual_allreduce": manual_allreduce, "torch_ddp": torch_ddp, "dtensor_mlp": dtensor_mlp,
             "lomo_dp2_clip": lomo_dp2_clip,
             **{name: (lambda layout=layout: collie_layout(layout)) for name, layout in COLLIE_LAYOUTS.items()},
             **{name: (lambda layout=layout: collie_memory(layout)) for name, layout in MEMORY_LAYOUTS.items()}}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    results = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name]()
        except Exception as error:  # report it and go on with the next scenario
            import traceback
            results[name] = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2500:]}"}
    write_rank_result(results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:] or list(SCENARIOS))
