"""Peak GPU memory of one training step, per GPU, as ``torch.cuda.max_memory_allocated`` would report it.

The peak is the largest of several moments of the step (``PHASES``), each the sum of what is alive then,
on top of the weights, the master copy and the optimizer state (kept all along):

| phase | alive then |
|---|---|
| forward_end | saved activations of the in-flight micro-batches, every autocast weight copy, the logits |
| loss | saved activations, the cross-entropy working set (batch·seq·vocab, fp32, three at once) |
| head_backward | saved activations, logits and their gradient, the lm_head gradient (or its fused update) |
| backward_start | saved activations (minus the head's), the top layer's recompute, one layer's backward work |
| backward_end | all gradients but the first layer's, that layer's activations and backward work, ZeRO buffers |
| optimizer_step | all gradients, ``step()`` temporaries (ZeRO-1: the broadcast buffer; fused: the last update) |

Weights are exact (``ModelArgs.num_params`` split as collie splits them) and activations are counted tensor
by tensor (``collie.estimate.activations``); both agree with a CPU allocation trace of collie's model to
within 0.2% when the loss is the peak and 5% otherwise (tests/test_estimate.py). Gradients accumulate, and
stay unsharded because collie turns gradient sync off until the last micro-batch, when a step has several
micro-batches. ZeRO follows ``collie.distributed.data_parallel``: stage 1 shards optimizer state, stage 2
(FSDP2 without resharding after forward) also gradients and the at-rest parameters but holds every unsharded
parameter from forward to backward, stage 3 holds the root group (embedding/norm/head) and two layers at a
time. ZeRO shards over the shard group: all of dp, or dp/dp_replicate ranks under HSDP (``dp_replicate`` > 1),
whose replicas each hold a whole sharded copy, times cp (collie folds cp into the data-parallel mesh); under ep a
rank holds num_experts/ep routed experts, which ZeRO shards over the dp/ep ranks holding the same ones
(``zero_shards``). Context parallelism divides the tokens a rank holds by cp (``activations``). LOMO/AdaLomo keep
no gradient set: only the parameter being updated, with its fp32 temporaries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from collie.estimate import activations as act
from collie.estimate.setup import DTYPE_BYTES, Setup
from collie.estimate.shapes import (Stage, Tensor, embedding_tensors, head_tensors, layer_tensors,
                                   setup_inventory, setup_stages, stage_tensors)
from collie.models.args import ModelArgs

GIB = 2 ** 30
# The caching allocator reserves more than it hands out (block rounding, fragmentation); typical steady-state
# reserved/allocated ratios of LLM training are 1.02–1.10.
ALLOCATOR_OVERHEAD = 0.05
# CUDA context, kernels and NCCL buffers: outside the caching allocator, so outside max_memory_allocated.
RUNTIME_OVERHEAD_GIB = 0.75
# Temporaries of one classic ``step()`` in units of the (local) trainable parameters, from collie/optim:
# fused AdamW none; Lion's ``update``; Adan's diff/next_n/step_size/direction (3 at once); Sophia's 2.
STEP_TEMPORARIES = {"adamw": 0, "lion": 1, "adan": 3, "sophia": 2, "lomo": 0, "adalomo": 0}
# Optimizer state tensors per parameter, each of the state dtype (adalomo: factored, see optimizer_state_bytes)
STATE_TENSORS = {"adamw": 2, "lion": 1, "adan": 4, "sophia": 2, "lomo": 0, "adalomo": 0}
PHASES = ("forward_end", "loss", "head_backward", "backward_start", "backward_end", "optimizer_step",
          "pipeline_steady")


@dataclass
class MemoryEstimate:
    """The per-GPU peak of the worst pipeline rank and what it is made of (GiB)."""
    setup: Setup
    peak_gib: float  # allocated peak, comparable to torch.cuda.max_memory_allocated
    reserved_gib: float  # what must fit on the GPU: peak·(1+ALLOCATOR_OVERHEAD) + RUNTIME_OVERHEAD_GIB
    phase: str  # the moment of the peak, one of PHASES
    breakdown: dict[str, float]  # components alive at the peak
    phases: dict[str, float]  # total of every phase
    host_gib: float = 0.0  # CPU memory per rank (offloaded params, grads, optimizer state)
    pp_rank: int = 0  # the pipeline rank with the highest peak
    per_rank_gib: list[float] = field(default_factory=list)  # peak of each pipeline rank

    def fits(self, gpu_mem_gib: float) -> bool:
        return self.reserved_gib <= gpu_mem_gib

    def to_dict(self) -> dict:
        return {"peak_gib": round(self.peak_gib, 3), "reserved_gib": round(self.reserved_gib, 3),
                "phase": self.phase, "pp_rank": self.pp_rank, "host_gib": round(self.host_gib, 3),
                "breakdown_gib": {k: round(v, 3) for k, v in self.breakdown.items()},
                "phases_gib": {k: round(v, 3) for k, v in self.phases.items()},
                "per_rank_gib": [round(v, 3) for v in self.per_rank_gib]}


def estimate_memory(args: ModelArgs, setup: Setup | None = None, pp_rank: int | None = None,
                    **fields) -> MemoryEstimate:
    """Peak memory per GPU for ``setup`` (or ``Setup(**fields)``; fields override a given setup): of pipeline
    rank ``pp_rank``, by default of the rank with the highest peak."""
    setup = (setup or Setup()).replace(**fields) if fields else (setup or Setup())
    setup.check_model(args)
    stages = setup_stages(args, setup)
    ranks = [_rank_estimate(args, setup, stage) for stage in stages]
    chosen = ranks[pp_rank] if pp_rank is not None else max(ranks, key=lambda r: r.peak_gib)
    chosen.per_rank_gib = [r.peak_gib for r in ranks]
    return chosen


# --- one pipeline rank -------------------------------------------------------------------------------------

def _rank_estimate(args: ModelArgs, setup: Setup, stage: Stage) -> MemoryEstimate:
    tensors = stage_tensors(args, stage, *setup_inventory(setup))
    resident, host = _resident(setup, tensors)
    phases = {name: {**resident, **parts} for name, parts in _phase_parts(args, setup, stage, tensors).items()}
    totals = {name: sum(parts.values()) / GIB for name, parts in phases.items()}
    peak_phase = max(totals, key=totals.get)
    peak = totals[peak_phase]
    breakdown = {k: v / GIB for k, v in phases[peak_phase].items() if v}
    return MemoryEstimate(setup, peak, peak * (1 + ALLOCATOR_OVERHEAD) + RUNTIME_OVERHEAD_GIB, peak_phase,
                          breakdown, totals, host / GIB, stage.pp_rank)


def zero_shards(setup: Setup, tensor: Tensor) -> int:
    """Ranks ZeRO shards ``tensor`` over: under ep a routed expert over the ranks holding the same experts
    (dp/ep), everything else over the data-parallel shard group × cp."""
    return setup.expert_shards if tensor.expert and setup.ep > 1 else setup.zero_shards


def sharded_numel(setup: Setup, tensors: list[Tensor], sharded: bool = True) -> int:
    """Local elements of ``tensors`` (tp shards), each FSDP-sharded over its ZeRO group if ``sharded``."""
    return sum(t.local_numel(setup.tp, zero_shards(setup, t) if sharded else 1) for t in tensors)


def _resident(setup: Setup, tensors: list[Tensor]) -> tuple[dict[str, float], float]:
    """Bytes kept on the GPU for the whole step (weights at rest, master copy, optimizer state) and on the
    host (CPU offload: FSDP2 keeps the sharded parameters, gradients and the optimizer on the CPU)."""
    weights = sharded_numel(setup, tensors, setup.zero_stage >= 2) * setup.param_bytes
    trainable = [t for t in tensors if t.trainable]
    shards = (lambda t: zero_shards(setup, t)) if setup.zero_stage >= 1 else (lambda t: 1)  # noqa: E731
    state = sum(optimizer_state_bytes(setup, [t]) / shards(t) for t in trainable)
    master = sum(_master_bytes(setup, [t]) / shards(t) for t in trainable)
    if setup.cpu_offload:
        grads = sharded_numel(setup, trainable) * setup.param_bytes
        return {"weights": 0.0, "master_weights": 0.0, "optimizer_state": 0.0}, weights + master + state + grads
    return {"weights": weights, "master_weights": master, "optimizer_state": state}, 0.0


def optimizer_state_bytes(setup: Setup, trainable: list[Tensor]) -> float:
    """Optimizer state of ``trainable`` (local tp shards, before ZeRO sharding).

    collie's AdamW (torch), Lion, Adan and Sophia keep their moments in the parameter dtype (``zeros_like``):
    AdamW exp_avg + exp_avg_sq, Lion exp_avg, Adan exp_avg/exp_avg_diff/exp_avg_sq/prev_grad, Sophia exp_avg +
    hessian; with ``master_weights`` (DeepSpeed) they are fp32. LOMO has none; AdaLomo keeps fp32 row and
    column second moments per matrix (Adafactor factoring) and a full fp32 one per vector."""
    if setup.optimizer == "adalomo":
        total = 0
        for t in trainable:
            shape = t.local_shape(setup.tp)
            total += 4 * (shape[0] + shape[1] if len(shape) == 2 else shape[0])
        return float(total)
    state_bytes = 4 if setup.master_weights else setup.param_bytes
    return float(STATE_TENSORS[setup.optimizer] * state_bytes * sum(t.local_numel(setup.tp) for t in trainable))


def _master_bytes(setup: Setup, trainable: list[Tensor]) -> float:
    if not setup.master_weights or setup.param_bytes == 4 or setup.fused:
        return 0.0
    return 4.0 * sum(t.local_numel(setup.tp) for t in trainable)


# --- what each phase adds --------------------------------------------------------------------------------

def _phase_parts(args: ModelArgs, setup: Setup, stage: Stage, tensors: list[Tensor]) -> dict[str, dict]:
    tokens = setup.micro_batch_size // setup.n_microbatches * setup.local_seq_len
    per_microbatch = _saved_per_microbatch(args, setup, stage, tokens)
    saved = _in_flight(setup, stage) * per_microbatch
    steady = _in_flight_with_grads(setup, stage)
    accumulated = _accumulated_grads(setup, tensors) or (_unsharded_grads(setup, tensors)
                                                         if steady == _in_flight(setup, stage) else 0.0)
    copies_all, copies_kept = _autocast_copies(args, setup, stage)
    layer_update = _fused_update_bytes(setup, _layer_params(args))
    head_saved = sum(act.head_bytes(args, setup).values()) * tokens if stage.has_head else 0.0
    gathered = partial(_gathered_params, args, setup, stage)
    phases = {
        "forward_end": {"gathered_params": gathered("forward"), "gradients": accumulated, "activations": saved,
                        "autocast_copies": copies_all,
                        "loss": act.logits_bytes(args, setup) * tokens if stage.has_head else 0.0},
        "backward_start": {"gathered_params": gathered("backward"),
                           "gradients": accumulated + _head_grads(args, setup, stage),
                           "activations": saved - (0.0 if _retains_graph(setup) else head_saved)
                           + _top_recompute_bytes(args, setup, stage, tokens),
                           "autocast_copies": copies_kept,
                           "transient": _layer_transient(args, setup, tokens, layer_update)},
        "backward_end": {"gathered_params": gathered("backward"),
                         "gradients": _final_grads(setup, tensors) - _first_layer_grads(args, setup, stage),
                         "activations": _last_layer_bytes(args, setup, tokens),
                         "autocast_copies": _one_layer_copies(args, setup),
                         "transient": _layer_transient(args, setup, tokens, layer_update)
                         + _reduce_buffers(args, setup)},
        "optimizer_step": {"gradients": _final_grads(setup, tensors),
                           "transient": _step_temporaries(setup, tensors) + _fused_update_bytes(setup, tensors)},
    }
    if 0 < steady < _in_flight(setup, stage):  # pipeline drain: gradients exist, one micro-batch fewer
        phases["pipeline_steady"] = {"gathered_params": gathered("backward"), "activations": steady * per_microbatch,
                                     "gradients": _unsharded_grads(setup, tensors), "autocast_copies": copies_kept,
                                     "transient": _layer_transient(args, setup, tokens, 0.0)}
    if stage.has_head:
        phases["loss"] = {"gathered_params": gathered("loss"), "gradients": accumulated, "activations": saved,
                          "autocast_copies": copies_kept, "loss": _loss_bytes(args, setup, tokens)}
        phases["head_backward"] = {"gathered_params": gathered("backward"), "activations": saved,
                                   "autocast_copies": copies_kept,
                                   "loss": _head_backward_logits(args, setup, tokens),
                                   "gradients": accumulated + (0.0 if setup.fused else _head_grads(args, setup, stage)),
                                   "transient": _fused_update_bytes(setup, _head_params(args, setup))}
    return phases


def _retains_graph(setup: Setup) -> bool:
    """LOMO/AdaLomo with clip_grad_norm on single-micro-batch steps run a norm-only backward with
    ``retain_graph=True`` first: every saved activation survives until the update backward."""
    return setup.fused and setup.clip_grad_norm > 0 and setup.grad_accum_steps == 1


def _layer_transient(args: ModelArgs, setup: Setup, tokens: int, fused_update: float) -> float:
    """Working set of one layer's backward beyond its saved activations: the largest of the SwiGLU gradients,
    a norm's fp32 backward and a fused optimizer's update of one of the layer's weights (they come one after
    the other), plus the residual gradients alive throughout."""
    mlp = act.mlp_backward_bytes(args, setup) * tokens
    norm = act.norm_backward_bytes(args, setup) * tokens
    residual = (act.residual_grad_bytes(args, setup) + act.cp_backward_bytes(args, setup)) * tokens
    if _retains_graph(setup):  # nothing saved is freed during the norm pass: gradients add up
        return 1.5 * mlp + fused_update + residual
    return max(mlp, norm, fused_update) + residual


def _in_flight(setup: Setup, stage: Stage) -> float:
    """Micro-batches whose activations a pp rank holds at once, in units of its whole stage: GPipe all n;
    1F1B min(n, pp − rank) (torch ``Schedule1F1B`` warm-up); interleaved: (warm-up + 1) chunks of half a
    rank's layers, warm-up = (2−1)·n/rounds + 2·(pp−1−rank) (torch ``_get_warmup_ops``)."""
    n, pp, rank = setup.n_microbatches, setup.pp, stage.pp_rank
    if pp == 1:
        return 1.0
    if setup.pp_schedule == "gpipe":
        return float(n)
    if setup.pp_schedule == "1f1b":
        return float(min(n, pp - rank))
    per_round = n // max(1, n // pp)
    chunks = min(per_round + 2 * (pp - 1 - rank) + 1, 2 * n)
    return chunks / setup.stages_per_rank


def _saved_per_microbatch(args: ModelArgs, setup: Setup, stage: Stage, tokens: int) -> float:
    """Activations one micro-batch leaves on this rank until its backward."""
    checkpointed = act.checkpointed_layers(setup, stage.layer_ids)
    full = stage.layers - checkpointed
    per_token = full * sum(act.layer_bytes(args, setup).values())
    per_token += checkpointed * act.checkpointed_layer_bytes(args, setup)
    if setup.activation_checkpointing == "attention":
        per_token -= full * act.attention_block_bytes(args, setup)
    if stage.has_embedding:
        per_token += act.embedding_bytes() - _frozen_input_savings(args, setup, stage)
    if stage.has_head:
        per_token += sum(act.head_bytes(args, setup).values())
    rotary = act.rotary_bytes(args, setup) * setup.local_seq_len
    return per_token * tokens + rotary + _cp_masks(args, setup, tokens)


def _cp_masks(args: ModelArgs, setup: Setup, tokens: int) -> float:
    """The context-parallel attention masks of one micro-batch (alive from its forward to the end of its backward)."""
    return act.cp_mask_bytes(args, setup) if tokens else 0.0


def _frozen_input_savings(args: ModelArgs, setup: Setup, stage: Stage) -> float:
    """With a frozen embedding (PEFT) nothing before the first adapter needs a gradient: the token ids and
    the first layer's input norm are not saved (per token)."""
    if setup.peft == "none" or act.checkpointed_layers(setup, stage.layer_ids[:1]):
        return 0.0
    first_norm = act.norm_bytes(args, setup, (), norm_trains=False)
    return act.embedding_bytes() + sum(first_norm.values())


def _top_recompute_bytes(args: ModelArgs, setup: Setup, stage: Stage, tokens: int) -> float:
    """The top layer's activations recomputed at the start of backward, if that layer is checkpointed (a
    lower checkpointed layer is recomputed after the full layers above it were freed: never more)."""
    if not stage.layer_ids or act.checkpointed_layers(setup, stage.layer_ids[-1:]) == 0:
        return 0.0
    return sum(act.layer_bytes(args, setup).values()) * tokens


def _last_layer_bytes(args: ModelArgs, setup: Setup, tokens: int) -> float:
    """Activations still alive at the end of backward: those of the first layer (recomputed or saved), and the
    context-parallel masks."""
    return sum(act.layer_bytes(args, setup).values()) * tokens + _cp_masks(args, setup, tokens)


def _loss_bytes(args: ModelArgs, setup: Setup, tokens: int) -> float:
    """Logits and cross-entropy working set of the micro-batch whose loss is computed, plus (GPipe) the saved
    loss state of the other in-flight micro-batches."""
    extra = (setup.n_microbatches - 1) if setup.pp > 1 and setup.pp_schedule == "gpipe" else 0
    return (act.loss_peak_bytes(args, setup) + extra * act.loss_saved_bytes(args, setup)) * tokens


def _head_backward_logits(args: ModelArgs, setup: Setup, tokens: int) -> float:
    """lm_head's backward: the gradient of the logits, and the logits if the loop still holds them."""
    return act.logits_bytes(args, setup) * tokens * (2 if setup.holds_logits else 1)


def _layer_params(args: ModelArgs) -> list[Tensor]:
    return [t for t in layer_tensors(args)]


def _head_params(args: ModelArgs, setup: Setup) -> list[Tensor]:
    return [t for t in head_tensors(args, setup.peft == "lora")]


def _head_grads(args: ModelArgs, setup: Setup, stage: Stage) -> float:
    """Gradients of the final norm and lm_head, produced first in backward (classic optimizers keep them)."""
    if not stage.has_head or setup.fused:
        return 0.0
    return setup.param_bytes * sum(t.local_numel(setup.tp) for t in _head_params(args, setup) if t.trainable)


def _first_layer_grads(args: ModelArgs, setup: Setup, stage: Stage) -> float:
    """Gradients not yet produced while the stage's first layer runs backward: that layer's and the
    embedding's (their share of what ``_final_grads`` counts at the end)."""
    frozen = setup.peft == "lora"
    first = layer_tensors(args, *setup_inventory(setup))
    first += embedding_tensors(args, frozen) if stage.has_embedding else []
    final = _final_grads(setup, first)
    return final if stage.layers else 0.0


def _accumulated_grads(setup: Setup, tensors: list[Tensor]) -> float:
    """Gradients alive during forward when a step accumulates several micro-batches (grad_accum_steps > 1):
    unsharded, since collie turns gradient sync off until the last micro-batch."""
    return _unsharded_grads(setup, tensors) if setup.grad_accum_steps > 1 else 0.0


def _unsharded_grads(setup: Setup, tensors: list[Tensor]) -> float:
    return setup.param_bytes * sum(t.local_numel(setup.tp) for t in tensors if t.trainable)


def _in_flight_with_grads(setup: Setup, stage: Stage) -> float:
    """Micro-batches in flight once the first backward has produced gradients (pipeline only): the 1F1B
    steady state keeps its warm-up count when there are more micro-batches than that (gradients then exist
    in every phase), otherwise (and under GPipe, which runs all forwards first) one fewer remains."""
    if setup.pp == 1:
        return 0.0
    live = _in_flight(setup, stage)
    steady = setup.pp_schedule != "gpipe" and setup.n_microbatches > live
    return live if steady else max(live - 1, 0.0)


def _final_grads(setup: Setup, tensors: list[Tensor]) -> float:
    """Gradients at the end of backward: none for fused optimizers (unless accumulating), 1/zero_shards under
    ZeRO-2/3 (reduce-scattered; on the host with CPU offload), all of them otherwise."""
    trainable = [t for t in tensors if t.trainable]
    if setup.fused:
        return _accumulated_grads(setup, tensors)
    if setup.zero_stage >= 2:
        return 0.0 if setup.cpu_offload else setup.param_bytes * sum(t.local_numel(setup.tp, zero_shards(setup, t))
                                                                     for t in trainable)
    return setup.param_bytes * sum(t.local_numel(setup.tp) for t in trainable)


def _gathered_params(args: ModelArgs, setup: Setup, stage: Stage, moment: str) -> float:
    """Unsharded parameters FSDP2 holds beyond the at-rest ones (``moment``: forward, loss or backward).

    ZeRO-0/1 use FSDP2's ``replicate``: the replicated parameters plus an unsharded copy from forward to
    backward, like ZeRO-2 (no resharding after forward): every parameter of the stage once more. ZeRO-3
    reshards after forward (the root group too: its all-gather repeats in backward): the root group
    (embedding/norm/head) and a layer in forward, nothing between forward and backward, the root and two
    layers (the current and the prefetched) in backward. Measured on CPU with gloo."""
    if setup.gradient_ranks == 1:
        return 0.0
    w, tp = setup.param_bytes, setup.tp
    if setup.zero_stage < 3:
        return w * sum(t.local_numel(tp) for t in stage_tensors(args, stage, *setup_inventory(setup)))
    layer = w * sum(t.local_numel(tp) for t in layer_tensors(args, *setup_inventory(setup)))
    ends = Stage(stage.pp_rank, 0, stage.has_embedding, stage.has_head, stage.stage_ids, ())
    root = w * sum(t.local_numel(tp) for t in stage_tensors(args, ends, *setup_inventory(setup)))
    return {"forward": root + layer, "loss": 0.0, "backward": root + 2 * layer}[moment]


def _autocast_copies(args: ModelArgs, setup: Setup, stage: Stage) -> tuple[float, float]:
    """16-bit copies autocast makes of fp32 linear weights (cached while autocast is on, then kept by autograd
    for backward; never ZeRO-sharded: the cast is of the gathered weight). Returns (all, kept after forward):
    checkpointed layers drop theirs when autocast exits."""
    if not setup.autocast:
        return 0.0, 0.0
    per_layer = _one_layer_copies(args, setup)
    head = args.vocab_size * args.hidden_size // setup.tp * DTYPE_BYTES[setup.compute_dtype] \
        if stage.has_head else 0
    kept_layers = stage.layers - act.checkpointed_layers(setup, stage.layer_ids)
    first = 0.0  # PEFT: q/k/v (and their lora_A) in the first layer read an input without grad: not saved
    if setup.peft != "none" and stage.has_embedding and stage.layers:
        unsaved = [t for t in layer_tensors(args, *setup_inventory(setup))
                   if t.name.split(".")[0] in ("q_proj", "k_proj", "v_proj") and not t.name.endswith("lora_B")]
        first = sum(t.local_numel(setup.tp) for t in unsaved) * DTYPE_BYTES[setup.compute_dtype]
    return stage.layers * per_layer + head - first, kept_layers * per_layer + head - first


def _one_layer_copies(args: ModelArgs, setup: Setup) -> float:
    """Autocast copies of one layer's matrices (LoRA factors included)."""
    if not setup.autocast:
        return 0.0
    linears = [t for t in layer_tensors(args, *setup_inventory(setup)) if len(t.shape) == 2]
    return sum(t.local_numel(setup.tp) for t in linears) * DTYPE_BYTES[setup.compute_dtype]


def _reduce_buffers(args: ModelArgs, setup: Setup) -> float:
    """Data-parallel reduction buffers of one layer group: FSDP2 copies a group's unsharded gradients into one
    flat buffer for the all-reduce (ZeRO-0/1) or reduce-scatter (ZeRO-2/3)."""
    if setup.gradient_ranks == 1 or setup.fused:
        return 0.0
    return setup.param_bytes * sum(t.local_numel(setup.tp) for t in layer_tensors(args, ep=setup.ep))


def _fused_update_bytes(setup: Setup, tensors: list[Tensor]) -> float:
    """LOMO/AdaLomo update of the largest trainable parameter of ``tensors`` (local shard), per element: its
    gradient w, an fp32 copy of a 16-bit gradient (``FusedOptimizer._apply``), and AdaLomo's one further fp32
    temporary at a time (g², then the update; ``collie/optim/adalomo.py``). LOMO updates inside the gradient."""
    if not setup.fused:
        return 0.0
    largest = max((t.local_numel(setup.tp, zero_shards(setup, t) if setup.zero_stage == 3 else 1)
                   for t in tensors if t.trainable), default=0)
    upcast = 4 if setup.param_bytes < 4 else 0
    extra = 4 if setup.optimizer == "adalomo" else 0
    return largest * (setup.param_bytes + upcast + extra)


def _step_temporaries(setup: Setup, tensors: list[Tensor]) -> float:
    """``step()`` temporaries (STEP_TEMPORARIES × local trainable state) and ZeRO-1's flat broadcast buffer
    (``shard_optimizer_state`` concatenates each owner's parameters)."""
    trainable = [t for t in tensors if t.trainable]
    state_bytes = 4 if setup.master_weights else setup.param_bytes
    local = sum(t.local_numel(setup.tp) / (zero_shards(setup, t) if setup.zero_stage >= 1 else 1) for t in trainable)
    temporaries = STEP_TEMPORARIES[setup.optimizer] * local * state_bytes
    broadcast = local * setup.param_bytes if setup.zero_stage == 1 and setup.gradient_ranks > 1 else 0.0
    return temporaries + broadcast
