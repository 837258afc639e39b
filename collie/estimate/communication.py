"""Bytes one rank's collectives move in one optimizer step, per mesh dimension, as collie's layouts issue them.

Every formula lists the collectives ``torch.distributed`` is called with (payload convention of
``collie.estimate.counting``: all-reduce/broadcast/send the buffer, all-gather the gathered output,
reduce-scatter the full input), so ``count_collective_bytes`` can check them exactly (tests/test_estimate.py).
T = tokens per pipeline micro-batch, h hidden, R the residual dtype (params'), C the compute dtype, w the
parameter bytes, P the rank's parameters (tp shards; FSDP pads dim 0 to a multiple of dp).

tp (``collie.distributed.tensor_parallel``; DTensor colwise/rowwise plans), per micro-batch and layer (a MoE block
runs whole on every tp rank and reduces nothing over tp: only attention's reductions; with sequence parallel its
input is all-gathered like a dense MLP's, and its output's shard and its input gradient's are local chunks):
  forward: all-reduce T·h·C after o_proj and down_proj (sequence parallel: reduce-scatter instead, and an
  all-gather T·h·R of the norm output before attention and before the MLP);
  backward: one all-reduce T·h·R of the input gradient of attention and of the MLP — q/k/v and gate/up share
  one replicated DTensor input, so their gradients are summed first (Megatron's 2 per layer); sequence
  parallel: a reduce-scatter instead, all-gathers of the o/down output gradients (T·h·C; a MoE block's output,
  and so its gradient, is in R: the experts' outputs are added into a tensor of the input's dtype) and an
  all-reduce of each norm weight's gradient;
  embedding: all-reduce T·h·R forward (SP: reduce-scatter forward, all-gather backward); lm_head: input
  gradient all-reduce T·h·R (SP: all-gather forward, reduce-scatter backward); vocab-parallel loss: three
  all-reduces of T fp32 values.
dp (``collie.distributed.data_parallel``), per step: ZeRO-0 all-reduce of the gradients (w·P_trainable);
  ZeRO-1 + broadcast of the updated parameters (w·P_trainable); ZeRO-2 all-gather of the parameters per
  forward + reduce-scatter of the gradients; ZeRO-3 all-gathers again in backward. LOMO/AdaLomo all-reduce
  each gradient in its hook (twice with clip_grad_norm: the norm pass). Gradient sync runs once per step.
  HSDP (dp_replicate > 1, ZeRO-2/3): the all-gathers and reduce-scatters run within the shard group of
  dp/dp_replicate ranks (still "dp"), and "dp_replicate" all-reduces each rank's reduce-scattered gradient
  shard (w·P_trainable/dp_shard) with the same shard of the other replicas, once per step.
  Context parallel: gradients are summed over dp × cp and ZeRO-2/3 shard over (a replica's) dp × cp ranks: the
  same collectives over the larger group ("dp" names it).
pp (``torch.distributed.pipelining``), per micro-batch: each local stage sends its output (T·h·R, /tp with
  sequence parallel) forward unless last and its input gradient backward unless first.
cp (``collie.distributed.context_parallel``), per micro-batch and layer, T = local tokens: all-gather of k and v
  (payload: the whole sequence's, cp·T·kv_heads·d each; k in the wider of R and C, as rotary leaves it, v in C),
  backward reduce-scatter of their gradients (same payloads).
ep (``collie.distributed.expert_parallel``), per micro-batch and MoE layer, with balanced routing (a rank sends
  and receives k·T rows): all-to-all of the chosen tokens' hidden states (k·T·h·R) and of the experts' outputs
  back (k·T·h·C), the same two in backward, and of the per-expert counts (E int64; control traffic when E ≤ 16).
  The experts' gradients are summed over the dp/ep ranks holding the same experts ("ep_replicate": ZeRO-0/1
  all-reduce, ZeRO-1 broadcast, ZeRO-2/3 gathers and reduce-scatter, as for dp), the rest over dp.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from collie.estimate.counting import CONTROL_MAX_NUMEL, wire_bytes
from collie.estimate.setup import DTYPE_BYTES, Setup
from collie.estimate.shapes import Stage, setup_inventory, setup_stages, stage_tensors
from collie.models.args import ModelArgs

FP32 = 4


@dataclass
class CommEstimate:
    """Collectives of one optimizer step on one pipeline rank: payload bytes by (dimension, kind), the bytes
    this rank sends with ring algorithms by dimension, and how exact each dimension's figure is."""
    setup: Setup
    pp_rank: int
    payload: dict[tuple[str, str], float]
    wire: dict[str, float]
    tokens_per_step: int  # tokens this rank's data-parallel replica processes per step
    approximate: list[str] = field(default_factory=list)  # dimensions whose formula is an upper bound

    def wire_per_token(self) -> float:
        return sum(self.wire.values()) / max(self.tokens_per_step, 1)

    def to_dict(self) -> dict:
        return {"pp_rank": self.pp_rank, "tokens_per_step": self.tokens_per_step,
                "payload_bytes": {f"{d}/{k}": int(v) for (d, k), v in sorted(self.payload.items())},
                "wire_bytes": {d: int(v) for d, v in sorted(self.wire.items())},
                "wire_bytes_per_token": round(self.wire_per_token(), 1), "approximate": self.approximate}


class _Ledger:
    """Accumulates collectives as (dimension, kind, payload bytes, group size)."""

    def __init__(self):
        self.payload: dict = defaultdict(float)
        self.wire: dict = defaultdict(float)

    def add(self, dim: str, kind: str, payload: float, group: int, times: float = 1) -> None:
        if group <= 1 or payload <= 0 or times <= 0:
            return
        self.payload[(dim, kind)] += payload * times
        self.wire[dim] += wire_bytes(kind, payload, group) * times


def estimate_communication(args: ModelArgs, setup: Setup | None = None, pp_rank: int | None = None,
                           **fields) -> CommEstimate:
    """Collectives of one optimizer step for pipeline rank ``pp_rank`` (default: the rank sending most)."""
    setup = (setup or Setup()).replace(**fields) if fields else (setup or Setup())
    setup.check_model(args)
    stages = setup_stages(args, setup)
    if pp_rank is not None:
        return _rank_comm(args, setup, stages[pp_rank])
    return max((_rank_comm(args, setup, s) for s in stages), key=lambda e: sum(e.wire.values()))


def _rank_comm(args: ModelArgs, setup: Setup, stage: Stage) -> CommEstimate:
    ledger = _Ledger()
    forwards = setup.grad_accum_steps * setup.n_microbatches  # micro-batch passes per local stage per step
    tokens = setup.micro_batch_size // setup.n_microbatches * setup.local_seq_len
    _tensor_parallel(ledger, args, setup, stage, tokens, forwards)
    approximate = _data_parallel(ledger, args, setup, stage)
    _pipeline(ledger, args, setup, stage, tokens, forwards)
    _context_parallel(ledger, args, setup, stage, tokens, forwards)
    _expert_parallel(ledger, args, setup, stage, tokens, forwards)
    return CommEstimate(setup, stage.pp_rank, dict(ledger.payload), dict(ledger.wire),
                        setup.micro_batch_size * setup.seq_len * setup.grad_accum_steps, approximate)


def _tensor_parallel(ledger: _Ledger, args: ModelArgs, setup: Setup, stage: Stage, tokens: int,
                     times: int) -> None:
    t, h = setup.tp, args.hidden_size
    residual = tokens * h * DTYPE_BYTES[setup.param_dtype]
    compute = tokens * h * DTYPE_BYTES[setup.compute_dtype]
    layers = stage.layers * times
    # blocks split over tp per layer: attention and a dense MLP; a MoE block runs whole on every tp rank
    blocks = layers * (1 if args.num_experts else 2)
    if setup.sequence_parallel:
        ledger.add("tp", "all_gather", residual, t, 2 * layers)  # norm outputs → attention, MLP
        ledger.add("tp", "reduce_scatter", compute, t, blocks)  # o_proj, down_proj outputs
        ledger.add("tp", "all_gather", compute, t, blocks)  # their output gradients
        ledger.add("tp", "all_gather", residual, t, 2 * layers - blocks)  # a MoE output's gradient (in R)
        ledger.add("tp", "all_reduce", h * setup.param_bytes, t, 2 * layers)  # norm weight gradients
    else:
        ledger.add("tp", "all_reduce", compute, t, blocks)
    # attention's and the MLP's input gradients, one collective each (q/k/v and gate/up share the input)
    ledger.add("tp", "reduce_scatter" if setup.sequence_parallel else "all_reduce", residual, t, blocks)
    if stage.has_embedding:
        if setup.sequence_parallel:
            ledger.add("tp", "reduce_scatter", residual, t, times)
            ledger.add("tp", "all_gather", residual, t, times)
        else:
            ledger.add("tp", "all_reduce", residual, t, times)
    if stage.has_head:
        if setup.sequence_parallel:
            ledger.add("tp", "all_gather", residual, t, times)  # lm_head input
            ledger.add("tp", "reduce_scatter", residual, t, times)  # its gradient
            ledger.add("tp", "all_reduce", h * setup.param_bytes, t, times)  # final norm weight gradient
        else:
            ledger.add("tp", "all_reduce", residual, t, times)
        ledger.add("tp", "all_reduce", tokens * FP32, t, 3 * times)  # vocab-parallel loss


def _data_parallel(ledger: _Ledger, args: ModelArgs, setup: Setup, stage: Stage) -> list[str]:
    """Returns the dimensions whose figure is approximate."""
    if setup.gradient_ranks == 1:
        return []
    tensors = stage_tensors(args, stage, *setup_inventory(setup))
    split = setup.ep > 1  # without ep the experts are reduced like the rest
    experts = [t for t in tensors if split and t.expert]
    _gradient_sync(ledger, setup, "dp", [t for t in tensors if not (split and t.expert)], setup.gradient_ranks,
                   setup.zero_shards, setup.dp_replicate)
    _gradient_sync(ledger, setup, "ep_replicate", experts, setup.expert_shards, setup.expert_shards, 1)
    return ["dp"] if setup.zero_stage == 3 and setup.pp > 1 else []


def _gradient_sync(ledger: _Ledger, setup: Setup, dim: str, tensors: list, ranks: int, shard: int,
                   replicas: int) -> None:
    """The collectives of ``tensors``' data-parallel units over ``ranks`` (ZeRO-2/3: ``shard`` ranks per replica,
    ``replicas`` replicas)."""
    w = setup.param_bytes
    trainable = [t for t in tensors if t.trainable]
    if setup.zero_stage in (0, 1):
        grads = w * sum(t.local_numel(setup.tp) for t in trainable)
        passes = 2 if setup.fused and setup.clip_grad_norm > 0 else 1
        ledger.add(dim, "all_reduce", grads, ranks, passes)
        if setup.zero_stage == 1:
            ledger.add(dim, "broadcast", grads, ranks)
        return
    gathered = shard * w * sum(t.local_numel(setup.tp, shard) for t in tensors)
    scattered = shard * w * sum(t.local_numel(setup.tp, shard) for t in trainable)
    if setup.zero_stage == 2:
        ledger.add(dim, "all_gather", gathered, shard, setup.grad_accum_steps)
    else:
        ledger.add(dim, "all_gather", gathered, shard, 2 * setup.grad_accum_steps * setup.n_microbatches)
    ledger.add(dim, "reduce_scatter", scattered, shard)
    ledger.add("dp_replicate", "all_reduce", scattered / shard, replicas)


def _pipeline(ledger: _Ledger, args: ModelArgs, setup: Setup, stage: Stage, tokens: int, times: int) -> None:
    if setup.pp == 1:
        return
    share = setup.tp if setup.sequence_parallel else 1
    boundary = tokens * args.hidden_size * DTYPE_BYTES[setup.param_dtype] / share
    last = setup.pp * setup.stages_per_rank - 1
    for stage_id in stage.stage_ids:
        sends = (stage_id < last) + (stage_id > 0)  # activations forward, input gradients backward
        ledger.add("pp", "send", boundary, setup.pp, sends * times)
        ledger.add("pp", "recv", boundary, setup.pp, sends * times)


def _context_parallel(ledger: _Ledger, args: ModelArgs, setup: Setup, stage: Stage, tokens: int,
                      times: int) -> None:
    if setup.cp == 1:
        return
    width = args.n_kv_heads * args.head_dim_ // setup.tp
    whole = tokens * setup.cp * width  # the gathered k (or v) of the whole sequence, elements
    k_bytes = max(DTYPE_BYTES[setup.param_dtype], DTYPE_BYTES[setup.compute_dtype])  # rotary: k·cos (cos in R)
    for size in (k_bytes, DTYPE_BYTES[setup.compute_dtype]):
        ledger.add("cp", "all_gather", whole * size, setup.cp, stage.layers * times)
        ledger.add("cp", "reduce_scatter", whole * size, setup.cp, stage.layers * times)


def _expert_parallel(ledger: _Ledger, args: ModelArgs, setup: Setup, stage: Stage, tokens: int,
                     times: int) -> None:
    if setup.ep == 1:
        return
    rows = args.num_experts_per_tok * tokens * args.hidden_size
    passes = stage.layers * times
    dispatch, combine = rows * DTYPE_BYTES[setup.param_dtype], rows * DTYPE_BYTES[setup.compute_dtype]
    ledger.add("ep", "all_to_all", dispatch + combine, setup.ep, 2 * passes)  # forward, and backward in reverse
    if args.num_experts > CONTROL_MAX_NUMEL:
        ledger.add("ep", "all_to_all", 8 * args.num_experts, setup.ep, passes)  # the counts per expert
