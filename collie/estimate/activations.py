"""Bytes that autograd saves for backward, per token, counted tensor by tensor for collie's decoder.

Source: the forward code in ``collie/models/components.py`` and the derivative formulas of the ops it calls
(an op saves an input only when another input needs a gradient). Checked on CPU against
``torch.autograd.graph.saved_tensors_hooks`` to the byte (tests/test_estimate.py). Notation: h hidden, i
intermediate, n_q/n_kv heads, d head_dim, t tensor-parallel degree, R the residual-stream dtype (the params'
dtype: the embedding output), C the compute dtype (autocast's, or the params'), all sizes in bytes.

Per norm (RMSNorm in fp32): the fp32 input 4h (saved by ``pow``), rsqrt 4, the normalised input R·h (saved by
``weight *`` when the weight trains), and the output for the linears that read it: one shared R·h tensor, or
one C·h autocast copy per linear that saves its input (a linear saves its input only when its weight trains
or it carries a LoRA adapter).
Attention (SDPA, flash/efficient kernels): q, k, v (k and v at n_q heads when collie repeats them for GQA),
the output (the o_proj input is a view of it) C·d each, logsumexp 4 per head.
SwiGLU: gate output (silu), silu output and up output (the product), and the product (down_proj) C·i each.
With sequence parallel the norm tensors are split over t along the sequence; the all-gathered norm output
the linears read is not.
Mixture of experts (``collie.models.moe``), per token: the router's fp32 softmax (E), top-k indices and weights;
per routed assignment (k per token; under ep a rank's experts receive k per local token when the routing is
balanced): the expert's input rows (R·h, or one C·h autocast copy for each of gate and up), its SwiGLU
tensors (C·i_moe each), its output (saved by the routing-weight product), the weighted output as ``index_add_``
keeps it (R·h), the routing weight and two int64 indices; the shared expert (Qwen2-MoE) as a dense SwiGLU plus
its output and sigmoid gate.
Context parallel (cp ranks, ``collie.distributed.context_parallel``): a rank holds s/cp tokens; SDPA saves the
k/v gathered from the whole sequence (cp × the local ones per local token) and, once per forward, the additive
(s/cp × s) mask (``cp_mask_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass

from collie.estimate.setup import DTYPE_BYTES, Setup
from collie.models.args import ModelArgs

FP32 = 4
INDEX = 8  # int64 token ids kept by the embedding


@dataclass(frozen=True)
class Widths:
    """Per-rank widths of one decoder layer under tensor parallelism."""
    hidden: int
    q: int  # n_q·d / t
    kv_saved: int  # width of k and v as SDPA saves them
    heads: int  # n_q / t
    inner: int  # i / t
    vocab: int  # V / t

    @classmethod
    def of(cls, args: ModelArgs, setup: Setup) -> "Widths":
        t, d = setup.tp, args.head_dim_
        kv_heads = args.num_attention_heads if setup.kv_repeated else args.n_kv_heads
        return cls(args.hidden_size, args.num_attention_heads * d // t, kv_heads * d // t,
                   args.num_attention_heads // t, args.intermediate_size // t, args.vocab_size // t)


def _trains(setup: Setup, linear: str, routed: bool = False) -> bool:
    """Whether ``linear`` saves its input: its weight trains (full fine-tuning) or it has a LoRA adapter (a
    routed expert's only with peft.lora_experts)."""
    if setup.peft == "none":
        return True
    return linear in setup.lora_targets and (setup.lora_experts or not routed)


def _adapted_per_token(args: ModelArgs, setup: Setup) -> int:
    """LoRA adapters one token passes through in a layer: each targeted attention, dense MLP and shared-expert
    linear once, each targeted routed-expert linear k times (with peft.lora_experts)."""
    attention = sum(_trains(setup, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(_trains(setup, name) for name in ("gate_proj", "up_proj", "down_proj"))
    if not args.num_experts:
        return attention + mlp
    routed = sum(_trains(setup, name, routed=True) for name in ("gate_proj", "up_proj", "down_proj"))
    return attention + (mlp if args.shared_expert_intermediate_size else 0) + args.num_experts_per_tok * routed


def norm_bytes(args: ModelArgs, setup: Setup, readers: tuple[str, ...], norm_trains: bool) -> dict[str, float]:
    """Saved bytes per token of one RMSNorm and of its output as the ``readers`` (linears) keep it."""
    h, t = args.hidden_size, setup.tp
    residual, compute = DTYPE_BYTES[setup.param_dtype], DTYPE_BYTES[setup.compute_dtype]
    seq_share = 1 / t if setup.sequence_parallel else 1.0
    out = {"norm_fp32_input": FP32 * h * seq_share, "norm_rsqrt": FP32 * seq_share}
    if norm_trains:
        out["norm_normalized"] = residual * h * seq_share
    savers = sum(_trains(setup, r) for r in readers)
    if savers:
        out["norm_output"] = compute * h * savers if setup.autocast else residual * h
    return out


def layer_bytes(args: ModelArgs, setup: Setup) -> dict[str, float]:
    """Saved bytes per token of one decoder layer that is not checkpointed (per rank)."""
    w, compute = Widths.of(args, setup), DTYPE_BYTES[setup.compute_dtype]
    norms_train = setup.peft == "none"
    out: dict[str, float] = {}
    mlp_readers = _moe_readers(args) if args.num_experts else ("gate_proj", "up_proj")
    for prefix, readers in (("attn", ("q_proj", "k_proj", "v_proj")), ("mlp", mlp_readers)):
        for key, value in norm_bytes(args, setup, readers, norms_train).items():
            out[f"{prefix}_{key}"] = value
    gathered = setup.padded_seq_len / setup.local_seq_len  # cp: SDPA keeps the whole sequence's k/v
    out.update(attn_q=compute * w.q, attn_k=compute * w.kv_saved * gathered,
               attn_v=compute * w.kv_saved * gathered, attn_out=compute * w.q, attn_logsumexp=FP32 * w.heads)
    out.update(moe_bytes(args, setup) if args.num_experts else swiglu_bytes(setup, w.inner, "mlp"))
    if setup.peft == "lora":
        out["lora_hidden"] = compute * setup.lora_r * _adapted_per_token(args, setup)
    return out


def swiglu_bytes(setup: Setup, inner: int, prefix: str, routed: bool = False) -> dict[str, float]:
    """Per token row of a SwiGLU of width ``inner`` (``routed``: a routed expert's): gate output (silu), silu and
    up outputs (the product), and the product (down_proj)."""
    compute = DTYPE_BYTES[setup.compute_dtype]
    out = {f"{prefix}_gate": compute * inner, f"{prefix}_silu": compute * inner, f"{prefix}_up": compute * inner}
    if _trains(setup, "down_proj", routed):
        out[f"{prefix}_product"] = compute * inner
    return out


def _moe_readers(args: ModelArgs) -> tuple[str, ...]:
    """The linears that read the MoE block's input as it is: the router, and the shared expert's gate/up and gate
    (the routed experts read rows copied out of it)."""
    return ("router",) + (("gate_proj", "up_proj", "shared_expert_gate")
                          if args.shared_expert_intermediate_size else ())


def moe_bytes(args: ModelArgs, setup: Setup) -> dict[str, float]:
    """Saved bytes per local token of a sparse MoE block beyond its input norm (see the module docstring): the
    expert load is assumed balanced, so that under ep a rank's experts receive k rows per local token."""
    h, k, experts = args.hidden_size, args.num_experts_per_tok, args.num_experts
    residual, compute = DTYPE_BYTES[setup.param_dtype], DTYPE_BYTES[setup.compute_dtype]
    # Mixtral keeps the routing weights in fp32; Qwen casts them to the router logits' dtype
    weight = FP32 if args.architecture == "mixtral" else compute
    # the rows copied to an expert, kept by its gate and up (under autocast each keeps its own cast)
    savers = sum(_trains(setup, name, routed=True) for name in ("gate_proj", "up_proj"))
    rows = (compute * savers if setup.autocast else residual * bool(savers)) * h
    routed = swiglu_bytes(setup, args.moe_intermediate_size_, "moe_expert", routed=True)
    out = {"moe_router": FP32 * experts + INDEX * k + (FP32 * (k + 1) if args.norm_topk_prob else 0),
           "moe_expert_input": k * rows, **{key: k * value for key, value in routed.items()},
           # ep: the experts' outputs are kept twice, by the local index_add and (sent back) by the weighting
           "moe_expert_output": k * (compute * (2 if setup.ep > 1 else 1) + residual) * h,
           "moe_routing": k * (weight + (3 if setup.ep > 1 else 2) * INDEX)}
    if args.router_aux_loss_coef:  # the load-balancing loss's softmax of the kept router logits, and its mask
        out["moe_router_loss"] = compute * experts + FP32
    shared = args.shared_expert_intermediate_size
    if shared:
        out.update(swiglu_bytes(setup, shared, "moe_shared"))
        out["moe_shared_output"] = compute * (h + 1)  # the product with sigmoid(shared_expert_gate)
    return out


def cp_mask_bytes(args: ModelArgs, setup: Setup) -> float:
    """Context parallel, per micro-batch: the additive (s/cp × s) attention masks every layer's SDPA keeps (in
    the compute dtype, built once per forward and window: ``SequenceShard.mask``): one per distinct attention
    window (full causal, and the sliding window of models that alternate), one row's worth (per row only with
    left padding or document masking). On CUDA every cp forward attends under them; on CPU collie's cp attention
    needs none (``chunked_causal_attention``; left padding and soft-capping aside). A mask-free attention on CUDA
    would change only this function."""
    if setup.cp == 1:
        return 0.0
    windows = len(set(_layer_windows(args)))
    return setup.local_seq_len * setup.padded_seq_len * windows * DTYPE_BYTES[setup.compute_dtype]


def _layer_windows(args: ModelArgs) -> list:
    """The attention window of every layer (None: full causal), as collie's decoder assigns them."""
    if not args.sliding_window:
        return [None]
    layer_types = getattr(args, "layer_types", None)
    if layer_types:
        return [args.sliding_window if kind == "sliding_attention" else None for kind in layer_types]
    return [args.sliding_window]


def cp_backward_bytes(args: ModelArgs, setup: Setup) -> float:
    """Per local token, the gradients of the gathered k and v during one layer's attention backward, before
    they are reduce-scattered to their owners."""
    if setup.cp == 1:
        return 0.0
    w = Widths.of(args, setup)
    return 2 * DTYPE_BYTES[setup.compute_dtype] * w.kv_saved * setup.padded_seq_len / setup.local_seq_len


def attention_block_bytes(args: ModelArgs, setup: Setup) -> float:
    """Per token, what checkpointing the attention block saves of a layer: q, k, v, its output and the
    softmax statistics (its input, the norm output, stays saved as the checkpoint's input)."""
    saved = layer_bytes(args, setup)
    return sum(saved[k] for k in ("attn_q", "attn_k", "attn_v", "attn_out", "attn_logsumexp"))


def checkpointed_layer_bytes(args: ModelArgs, setup: Setup) -> float:
    """A checkpointed layer keeps only its input: the residual stream (split along the sequence under SP)."""
    share = 1 / setup.tp if setup.sequence_parallel else 1.0
    return DTYPE_BYTES[setup.param_dtype] * args.hidden_size * share


def mlp_backward_bytes(args: ModelArgs, setup: Setup) -> float:
    """Per token, the SwiGLU backward's peak beyond the saved activations: the gradients of the product, of
    silu's output and of up exist while the saved product is already freed: net two intermediate-width
    tensors. Read from a CPU allocation trace of collie's layer (tests/test_estimate.py checks the total).
    MoE: the larger of the shared expert (every token) and one routed expert (k·ep/E rows per local token)."""
    inner = Widths.of(args, setup).inner
    if args.num_experts:
        routed = args.moe_intermediate_size_ * args.num_experts_per_tok * setup.ep / args.num_experts
        inner = max(args.shared_expert_intermediate_size or 0, routed)
    return 2 * DTYPE_BYTES[setup.compute_dtype] * inner


def norm_backward_bytes(args: ModelArgs, setup: Setup) -> float:
    """Per token, an RMSNorm backward's fp32 temporaries (its derivative chain pow → mean → rsqrt → mul runs
    in fp32 whatever the model dtype; up to four hidden-width fp32 tensors at once in the trace)."""
    share = 1 / setup.tp if setup.sequence_parallel else 1.0
    return 4 * FP32 * args.hidden_size * share


def residual_grad_bytes(args: ModelArgs, setup: Setup) -> float:
    """Per token, the residual stream's gradient and the branch's, alive through a layer's backward."""
    return 2 * DTYPE_BYTES[setup.param_dtype] * args.hidden_size


def checkpointed_layers(setup: Setup, layer_ids) -> int:
    """How many of ``layer_ids`` collie checkpoints: all (full), index % every == 0 (selective), none."""
    if setup.activation_checkpointing == "full":
        return len(layer_ids)
    if setup.activation_checkpointing == "selective":
        return sum(1 for i in layer_ids if i % setup.checkpoint_every == 0)
    return 0


def embedding_bytes() -> float:
    """The embedding keeps the int64 token ids."""
    return INDEX


def rotary_bytes(args: ModelArgs, setup: Setup) -> float:
    """cos and sin per position (shared by the batch and every layer of a stage), in the residual dtype."""
    return 2 * args.head_dim_ * DTYPE_BYTES[setup.param_dtype]


def head_bytes(args: ModelArgs, setup: Setup) -> dict[str, float]:
    """Final norm and lm_head input kept for backward (per token), not the logits."""
    out = norm_bytes(args, setup, ("lm_head",), setup.peft == "none")
    return {f"head_{k}": v for k, v in out.items()}


def logits_bytes(args: ModelArgs, setup: Setup) -> float:
    """lm_head output per token: vocabulary (split over tp, never gathered) in the compute dtype."""
    return DTYPE_BYTES[setup.compute_dtype] * Widths.of(args, setup).vocab


def loss_saved_bytes(args: ModelArgs, setup: Setup) -> float:
    """What the loss keeps per token between its forward and backward: the fp32 log-probabilities
    (F.cross_entropy) or softmax (vocab-parallel loss), plus the logits when the loop holds them."""
    held = logits_bytes(args, setup) if setup.holds_logits else 0.0
    return FP32 * Widths.of(args, setup).vocab + held


def loss_peak_bytes(args: ModelArgs, setup: Setup) -> float:
    """Peak bytes per token of the loss, forward or backward (``collie.loss.causal_lm_loss_sum`` and
    ``_VocabParallelCrossEntropySum``), per element of the local vocabulary V/t, C = logits dtype:

    * forward: logits C + fp32 copy 4 + log-probs (shifted logits) 4 → C + 8 (C + 4 for fp32 logits on one
      rank: ``.float()`` is then the same tensor);
    * backward: saved log-probs (softmax) 4 + incoming grad 4 + grad of the input 4 (+ the tp loss's cast back
      to C) + the held logits C.
    """
    vocab, compute = Widths.of(args, setup).vocab, DTYPE_BYTES[setup.compute_dtype]
    held = compute if setup.holds_logits else 0
    forward = compute + (4 if compute == FP32 and setup.tp == 1 else 8)
    backward = 3 * FP32 + (compute if setup.tp > 1 else 0) + held
    return vocab * max(forward, backward)
