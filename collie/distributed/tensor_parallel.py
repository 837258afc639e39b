"""Tensor (and sequence) parallelism applied from outside with DTensor ``parallelize_module`` plans.

Per decoder layer: q/k/v/gate/up are column-parallel (heads and the MLP width are split), o/down are
row-parallel (their outputs are all-reduced, or reduce-scattered along the sequence with sequence parallel).
The embedding is vocab-parallel (rows split, output all-reduced); ``lm_head`` is column-parallel and keeps its
output sharded on the vocab dimension, so full-vocabulary logits are never gathered:
``vocab_parallel_loss_sum`` computes the cross-entropy from the shards. Rotary buffers and position ids stay
replicated; attention reads its local head count from tensor shapes, so the model needs no TP code.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               PrepareModuleInputOutput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from collie.loss import IGNORE_INDEX, shift_labels, token_loss_sum
from collie.models.components import RMSNorm
from collie.models.moe import SparseMoE


def apply_tensor_parallel(model, tp_mesh, sequence_parallel: bool = False, adapt_plan=None) -> None:
    """Shard ``model`` (a whole model or a pipeline stage of it, on any device incl. meta) over ``tp_mesh``.

    ``adapt_plan(plan) -> plan`` rewrites each plan before it is applied (LoRA wraps the linears' styles so
    its factors follow the base weights: ``collie.peft.lora_tensor_parallel_plan``)."""
    adapt_plan = adapt_plan or (lambda plan: plan)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    for layer in model.model.layers.values():
        plan = _decoder_layer_plan(sequence_parallel, _layer_norms(layer), _head_norms(layer), _residual_norms(layer))
        if isinstance(layer.mlp, SparseMoE):
            dense = {k: v for k, v in plan.items() if not k.startswith("mlp")}
            plan = {**dense, **_moe_plan(layer.mlp, sequence_parallel)}
        parallelize_module(layer, tp_mesh, adapt_plan(plan))
    parallelize_module(model, tp_mesh, adapt_plan(_outer_plan(model, sequence_parallel)))
    for name, param in model.named_parameters():
        if name in frozen:  # SequenceParallel re-creates parameters trainable (torch 2.13): keep them frozen
            param.requires_grad_(False)
    model.register_forward_pre_hook(_align_gradient_placements)
    if getattr(model.args, "tie_word_embeddings", False) and model.lm_head is not None \
            and model.model.embed_tokens is not None:
        # Both plans shard the shared [vocab, hidden] weight on dim 0; they made two parameters of it: re-tie.
        model.lm_head.weight = model.model.embed_tokens.weight
    if sequence_parallel and model.model.embed_tokens is not None:
        model.register_forward_pre_hook(_fill_position_ids, with_kwargs=True)


def _decoder_layer_plan(sequence_parallel: bool, norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm"),
                        head_norms: tuple[str, ...] = (), residual_norms: tuple[str, ...] = ()) -> dict:
    """``norms``: the layer's norms over the residual stream (two, or four with sandwich norms), which see the
    residual's layout, ``residual_norms`` those of them whose output is added to the residual (sandwich norms);
    ``head_norms``: the attention's per-head norms (QK-norm), which see the rank's heads."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=residual),
    }
    # Attention and MLP get their input as one replicated DTensor (all-gathered along the sequence first with
    # sequence parallel), shared by q/k/v and by gate/up: the input gradients of those linears add up as one
    # Partial DTensor and are reduced once per module (Megatron's 2 forward + 2 backward collectives per layer),
    # not once per linear. DecoderLayer calls self_attn(x, cos, sin, mask) and mlp(x): only x is distributed.
    plan.update({
        "self_attn": PrepareModuleInput(input_layouts=(residual, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None),
                                        use_local_output=False),
        "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                  use_local_output=False),
    })
    # norms run on sequence shards with sequence parallel (a sandwich norm's input, the o_proj/down_proj output,
    # is in the residual's layout too)
    plan.update({name: SequenceParallel() if sequence_parallel else ReplicateParallel() for name in norms})
    if sequence_parallel:  # sandwich norms' outputs are added to the plain residual tensor: hand them back plain
        plan.update({name: SequenceParallel(use_local_output=True) for name in residual_norms})
    # (batch, seq, heads, head_dim) with this rank's heads: normalized over head_dim, no communication; the weight
    # gradient is a Partial sum over the heads, all-reduced by _align_gradient_placements
    plan.update({f"self_attn.{name}": ReplicateParallel(input_placement=Shard(2)) for name in head_norms})
    return plan


def _moe_plan(block: SparseMoE, sequence_parallel: bool) -> dict:
    """A mixture-of-experts block runs whole on every tp rank, on the whole (replicated) sequence: its router and
    shared expert are replicated DTensors (``ReplicateParallel``), its routed experts stay plain tensors (expert
    parallelism splits them over data-parallel ranks, on a mesh of its own). Every tp rank computes the same
    output and the same gradients, so nothing is reduced over tp; with sequence parallel the block's input is
    all-gathered along the sequence and each rank keeps its own part of the output (whose gradient is
    all-gathered in backward)."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {"mlp": PrepareModuleInputOutput(input_layouts=(residual,), desired_input_layouts=(Replicate(),),
                                            use_local_input=True, output_layouts=(Replicate(),),
                                            desired_output_layouts=(residual,), use_local_output=True),
            "mlp.gate": ReplicateParallel()}
    if block.shared_expert is not None:
        plan.update({"mlp.shared_expert": ReplicateParallel(), "mlp.shared_expert_gate": ReplicateParallel()})
    return plan


def _layer_norms(layer) -> tuple[str, ...]:
    """Names of a decoder layer's own norms (its children that are RMSNorms: not the attention's QK-norms)."""
    return tuple(name for name, child in layer.named_children() if isinstance(child, RMSNorm))


def _residual_norms(layer) -> tuple[str, ...]:
    """The norms whose output is added to the residual stream: a sandwich layer's post-block norms."""
    return ("post_attention_layernorm", "post_feedforward_layernorm") if getattr(layer, "sandwich", False) else ()


def _head_norms(layer) -> tuple[str, ...]:
    """Names of the per-head norms of a decoder layer's attention (``q_norm``/``k_norm`` with QK-norm)."""
    return tuple(name for name in ("q_norm", "k_norm") if isinstance(getattr(layer.self_attn, name, None), nn.Module))


def _outer_plan(model, sequence_parallel: bool) -> dict:
    """Embedding, final norm and head, for the ones this (stage) model has."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.model.embed_tokens is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.model.norm is not None:
        plan["model.norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)
    return plan


def _align_gradient_placements(module, args) -> None:
    """Give every DTensor parameter a gradient with the parameter's own placements.

    DTensor's embedding backward yields a replicated full-vocabulary gradient (sliced back to the rank's vocab
    shard, no communication) and sequence-parallel norms yield Partial gradients (all-reduced once here instead
    of inside every optimizer op). Registered at forward time because ``to_empty`` replaces parameters; under
    FSDP the hooks sit on sharded parameters that autograd never reaches, and FSDP does the same itself."""
    for param in module.parameters():
        if isinstance(param, DTensor) and param.requires_grad and not getattr(param, "_collie_grad_hook", False):
            param.register_hook(partial(_to_placements, param.placements))
            param._collie_grad_hook = True


def _to_placements(placements, grad):
    if isinstance(grad, DTensor) and grad.placements != placements:
        return grad.redistribute(grad.device_mesh, placements)
    return grad


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors over tp, inputs and outputs plain tensors: every parameter is then a
    DTensor on the tp mesh, which foreach optimizers and the gradient norm need (no Tensor/DTensor mixing).
    ``input_placement`` says how the plain inputs are laid out over tp (``Shard(2)``: each rank has its heads)."""

    def __init__(self, input_placement=Replicate()):
        super().__init__()
        self.input_placement = input_placement

    def _apply(self, module, device_mesh):
        return distribute_module(module, device_mesh, input_fn=self._inputs_to_dtensor,
                                 output_fn=self._output_to_local)

    def _inputs_to_dtensor(self, module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, (self.input_placement,), run_check=False)
                     if torch.is_tensor(x) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _output_to_local(module, output, device_mesh):
        return output.to_local() if isinstance(output, DTensor) else output


def _fill_position_ids(module, args, kwargs):
    """With sequence parallel the model sees only a sequence shard after the embedding, so it cannot derive
    positions from its input's length: pass the full-length default explicitly."""
    input_ids = args[0] if args else kwargs["input_ids"]
    if len(args) > 1:
        if args[1] is None:
            args = (args[0], _default_positions(input_ids), *args[2:])
    elif kwargs.get("position_ids") is None:
        kwargs["position_ids"] = _default_positions(input_ids)
    return args, kwargs


def _default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None]


# --- vocab-parallel cross-entropy --------------------------------------------------------------------------

def vocab_parallel_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``causal_lm_loss_sum`` for logits sharded on the vocab dimension (a DTensor from ``lm_head`` under TP);
    plain tensors go to ``causal_lm_loss_sum`` itself, so callers can use this one in every layout.

    Returns a plain scalar, equal on every tp rank; its backward needs no context manager. Communication: three
    all-reduces of (tokens,)-sized tensors over the tp group; the (tokens, vocab) logits are never gathered."""
    return vocab_parallel_token_loss_sum(logits, shift_labels(labels))


def vocab_parallel_token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``vocab_parallel_loss_sum`` of already shifted ``targets`` (context parallelism shifts before its split)."""
    if not isinstance(logits, DTensor):
        return token_loss_sum(logits, targets)
    if logits.device_mesh.ndim != 1 or logits.placements[0] != Shard(logits.ndim - 1):
        return token_loss_sum(logits.full_tensor(), targets)
    local = logits.to_local()
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    return _VocabParallelCrossEntropySum.apply(local.flatten(0, -2), targets.flatten(), offset[-1],
                                               logits.device_mesh.get_group())


class _VocabParallelCrossEntropySum(torch.autograd.Function):
    """Sum of token cross-entropies from vocab shards (Megatron's vocab-parallel cross-entropy), in fp32."""

    @staticmethod
    def forward(ctx, local_logits, targets, vocab_start, group):
        logits = local_logits.float()
        local_vocab = logits.shape[-1]
        row_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - row_max
        exp = logits.exp()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)
        valid = targets != IGNORE_INDEX
        local_targets = targets - vocab_start
        here = valid & (local_targets >= 0) & (local_targets < local_vocab)
        index = torch.where(here, local_targets, 0)[:, None]
        target_logit = logits.gather(1, index).squeeze(1) * here
        dist.all_reduce(target_logit, group=group)
        loss = ((sum_exp.squeeze(1).log() - target_logit) * valid).sum()
        exp.div_(sum_exp)  # softmax, kept for backward
        ctx.save_for_backward(exp, index, here, valid)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, index, here, valid = ctx.saved_tensors
        grad = softmax * valid[:, None]
        grad.scatter_add_(1, index, -here[:, None].to(grad.dtype))
        return (grad * grad_output).to(ctx.input_dtype), None, None, None


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Gathered (batch, seq, vocab) logits for generation/evaluation code that needs the whole vocabulary."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits
