"""The parameter inventory of a Llama-family model and how a layout splits it over ranks.

Counts follow ``collie.models`` exactly (``ModelArgs.num_params()`` equals the sum of ``model_tensors``), so
weight bytes are exact; tensor-parallel sharding follows ``collie.distributed.tensor_parallel`` (q/k/v/gate/up
split on the output dim, o/down on the input dim, embedding and lm_head on the vocabulary, norms replicated)
and pipeline stages follow ``collie.distributed.pipeline.split_layers``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from collie.models.args import ModelArgs


@dataclass(frozen=True)
class Tensor:
    """One parameter: its full shape and the dim tensor parallel splits (None = replicated)."""
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    trainable: bool = True
    expert: bool = False  # a routed expert's: split over ep ranks, ZeRO-sharded over the ranks holding it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.tp_dim is None or tp == 1:
            return self.shape
        shape = list(self.shape)
        shape[self.tp_dim] //= tp
        return tuple(shape)

    def local_numel(self, tp: int, dp_shards: int = 1) -> int:
        """Elements on one rank: the tp shard, then FSDP's dim-0 shard padded to a multiple of ``dp_shards``
        (FSDP2 pads dim 0 to a multiple of the shard count; what the all-gather moves)."""
        shape = self.local_shape(tp)
        if dp_shards == 1:
            return math.prod(shape)
        return math.ceil(shape[0] / dp_shards) * math.prod(shape[1:])


def layer_tensors(args: ModelArgs, lora_targets: tuple[str, ...] = (), lora_r: int = 0, ep: int = 1,
                  lora_experts: bool = False) -> list[Tensor]:
    """The parameters of one decoder layer on one rank; with LoRA the base weights are frozen and adapters added
    (to the routed experts only with ``lora_experts``); with ``ep`` > 1 a rank holds num_experts/ep of the routed
    experts."""
    h, d = args.hidden_size, args.head_dim_
    q, kv, inner = args.num_attention_heads * d, args.n_kv_heads * d, args.intermediate_size
    frozen = bool(lora_r)
    out = [Tensor("q_proj", (q, h), 0, not frozen), Tensor("k_proj", (kv, h), 0, not frozen),
           Tensor("v_proj", (kv, h), 0, not frozen), Tensor("o_proj", (h, q), 1, not frozen),
           *(_moe_tensors(args, frozen, ep) if args.num_experts else
             [Tensor("gate_proj", (inner, h), 0, not frozen), Tensor("up_proj", (inner, h), 0, not frozen),
              Tensor("down_proj", (h, inner), 1, not frozen)]),
           Tensor("input_layernorm", (h,), None, not frozen), Tensor("post_attention_layernorm", (h,), None,
                                                                         not frozen)]
    if args.sandwich_norms:  # Gemma's pre/post-feedforward norms
        out += [Tensor(name, (h,), None, not frozen) for name in ("pre_feedforward_layernorm",
                                                                  "post_feedforward_layernorm")]
    if args.qk_norm:  # over head_dim, replicated like the other norms
        out += [Tensor("q_norm", (d,), None, not frozen), Tensor("k_norm", (d,), None, not frozen)]
    if args.qkv_bias:
        out += [Tensor("q_proj.bias", (q,), 0, not frozen), Tensor("k_proj.bias", (kv,), 0, not frozen),
                Tensor("v_proj.bias", (kv,), 0, not frozen)]
    if args.o_bias:
        out.append(Tensor("o_proj.bias", (h,), None, not frozen))
    if args.mlp_bias:
        out += [Tensor("gate_proj.bias", (inner,), 0, not frozen), Tensor("up_proj.bias", (inner,), 0, not frozen),
                Tensor("down_proj.bias", (h,), None, not frozen)]
    return out + lora_tensors(out, lora_targets, lora_r, lora_experts) if lora_r else out


def lora_tensors(tensors: list[Tensor], targets: tuple[str, ...], r: int, experts: bool = False) -> list[Tensor]:
    """The LoRA factors of ``tensors``' targeted weights: as ``collie.peft.apply_lora``, every linear whose last
    name component is a target (``experts.gate_proj`` for ``gate_proj``), a routed expert's only with ``experts``
    (peft.lora_experts). A factor is split as its base: over tp (column-parallel: B (out, r) with the output;
    row-parallel: A (r, in) with the input), a routed expert's over ep with its expert."""
    out = []
    for base in tensors:
        if len(base.shape) != 2 or base.name.rsplit(".", 1)[-1] not in targets or (base.expert and not experts):
            continue
        rows, cols = base.shape
        out.append(Tensor(f"{base.name}.lora_A", (r, cols), 1 if base.tp_dim == 1 else None, expert=base.expert))
        out.append(Tensor(f"{base.name}.lora_B", (rows, r), 0 if base.tp_dim == 0 else None, expert=base.expert))
    return out


def _moe_tensors(args: ModelArgs, frozen: bool, ep: int = 1) -> list[Tensor]:
    """A sparse MoE block (collie.models.moe): the router and one SwiGLU per routed expert, each its own
    parameters (FSDP shards each on its own; expert parallelism keeps num_experts/ep of them on a rank,
    ``collie.distributed.expert_parallel``), plus the shared expert and its gate; not tensor parallel."""
    h, inner, shared = args.hidden_size, args.moe_intermediate_size_, args.shared_expert_intermediate_size
    expert = lambda width, routed: [  # noqa: E731
        Tensor(f"{'experts' if routed else 'shared_expert'}.{name}", shape, None, not frozen, routed)
        for name, shape in (("gate_proj", (width, h)), ("up_proj", (width, h)), ("down_proj", (h, width)))]
    out = [Tensor("router", (args.num_experts, h), None, not frozen), *expert(inner, True) * (args.num_experts // ep)]
    if shared:
        out += [*expert(shared, False), Tensor("shared_expert_gate", (1, h), None, not frozen)]
    return out


def active_params(args: ModelArgs) -> int:
    """Parameters one token passes through: all but the routed experts it is not sent to (top-k of them)."""
    if not args.num_experts:
        return args.num_params()
    routed = sum(t.numel for t in _moe_tensors(args, False) if t.expert)
    idle = routed * (args.num_experts - args.num_experts_per_tok) // args.num_experts
    return args.num_params() - idle * args.num_hidden_layers


def embedding_tensors(args: ModelArgs, frozen: bool = False) -> list[Tensor]:
    return [Tensor("embed_tokens", (args.vocab_size, args.hidden_size), 0, not frozen)]


def head_tensors(args: ModelArgs, frozen: bool = False) -> list[Tensor]:
    """Final norm and lm_head (the head shares the embedding's tensor when tied: counted there)."""
    out = [Tensor("norm", (args.hidden_size,), None, not frozen)]
    if not args.tie_word_embeddings:
        out.append(Tensor("lm_head", (args.vocab_size, args.hidden_size), 0, not frozen))
    return out


@dataclass(frozen=True)
class Stage:
    """What one pipeline rank holds: its layers (all its virtual stages) and whether it has the ends."""
    pp_rank: int
    layers: int
    has_embedding: bool
    has_head: bool
    stage_ids: tuple[int, ...]
    layer_ids: tuple[int, ...]  # the decoder layers, in model order


def pipeline_stages(args: ModelArgs, pp: int, stages_per_rank: int = 1, split: str = "uniform",
                    boundaries=None) -> list[Stage]:
    """The stage of every pp rank, split as ``collie.distributed.pipeline.split_layers`` does (rank r holds
    stages r and r+pp with the interleaved schedule)."""
    total = pp * stages_per_rank
    ranges = _split_layers(args, total, split, boundaries)
    stages = []
    for rank in range(pp):
        ids = tuple(rank + k * pp for k in range(stages_per_rank))
        layer_ids = tuple(i for stage_id in ids for i in ranges[stage_id])
        stages.append(Stage(rank, len(layer_ids), 0 in ids, total - 1 in ids, ids, layer_ids))
    return stages


def setup_stages(args: ModelArgs, setup) -> list[Stage]:
    """``pipeline_stages`` for a ``Setup``."""
    return pipeline_stages(args, setup.pp, setup.stages_per_rank, setup.pp_split, setup.pp_boundaries)


def setup_inventory(setup) -> tuple:
    """What a rank's inventory depends on, as ``layer_tensors``/``stage_tensors`` take it after the stage: the
    LoRA targets and rank (or none), ep, and whether the routed experts are adapted."""
    if setup.peft != "lora":
        return (), 0, setup.ep, False
    return setup.lora_targets, setup.lora_r, setup.ep, setup.lora_experts


def _split_layers(args: ModelArgs, num_stages: int, split: str, boundaries=None) -> list[range]:
    if num_stages == 1:
        return [range(args.num_hidden_layers)]
    from collie.distributed.pipeline import split_layers
    sizes = None
    if split == "balanced" and boundaries is None:
        layer = sum(t.numel for t in layer_tensors(args))
        sizes = [args.vocab_size * args.hidden_size, *[layer] * args.num_hidden_layers,
                 sum(t.numel for t in head_tensors(args))]
    return split_layers(args.num_hidden_layers, num_stages, split, list(boundaries) if boundaries else None, sizes)


def model_tensors(args: ModelArgs) -> list[Tensor]:
    """Every parameter of the full model (one layer's list repeated per layer)."""
    return embedding_tensors(args) + layer_tensors(args) * args.num_hidden_layers + head_tensors(args)


def stage_tensors(args: ModelArgs, stage: Stage, lora_targets=(), lora_r: int = 0, ep: int = 1,
                  lora_experts: bool = False) -> list[Tensor]:
    """The parameters one pp rank holds (layers repeated; embedding/head where the stage has them; 1/ep of the
    routed experts)."""
    frozen = bool(lora_r)
    out = embedding_tensors(args, frozen) if stage.has_embedding else []
    out += layer_tensors(args, lora_targets, lora_r, ep, lora_experts) * stage.layers
    if stage.has_head:
        out += head_tensors(args, frozen)
        if args.tie_word_embeddings and not stage.has_embedding:  # unreachable: collie forbids tied + pp
            out += embedding_tensors(args, frozen)
    return out
