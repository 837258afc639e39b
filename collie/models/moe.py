"""Mixture-of-experts families on the shared decoder: Mixtral, Qwen2-MoE (with a gated shared expert) and Qwen3-MoE.

Each layer's MLP is a ``SparseMoE`` block: a linear router scores the experts, every token goes to its top-k
(dropless: no capacity, no token is dropped) and the block loops over the experts, gathering their tokens with
``index_select`` and adding the weighted outputs back with ``index_add_``. Routing follows transformers exactly
(softmax in fp32 over the router logits, top-k, renormalised when ``norm_topk_prob``).

Auxiliary losses reach the training loss without the model knowing the trainer: in training the model records
``auxiliary_loss`` (router_aux_loss_coef × transformers' ``load_balancing_loss_func`` over all its layers +
router_z_loss_coef × z-loss) after each forward, and the engine adds what the modules recorded
(``collie.loss.auxiliary_loss_sum``). Each block also counts the tokens routed to each expert, which the engine
reports as ``moe/*`` metrics (``expert_load_metrics``).

Checkpoints store one linear per expert (transformers 5 saves its fused 3-D experts that way too): Qwen's names
are collie's; Mixtral's ``block_sparse_moe.experts.N.w1/w2/w3`` are renamed on load and save.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from collie.errors import ConfigError
from collie.models.args import ModelArgs
from collie.models.components import DecoderLayer
from collie.models.llama import LlamaForCausalLM, _qwen2_sliding_window, _rename
from collie.models.registry import register_model


class Expert(nn.Module):
    """One SwiGLU expert: down(silu(gate(x)) · up(x)), without biases."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Top-k routed experts (``gate`` is the router), plus an always-on ``shared_expert`` scaled by
    sigmoid(``shared_expert_gate``) when ``shared_expert_intermediate_size`` is set (Qwen2-MoE).

    In training mode the block keeps its last router logits and choices (``routing``) for the model's auxiliary
    losses and metrics; it holds no other state.

    ``dispatch`` is the hook a parallel plan replaces: ``dispatch(block, flat, weights, chosen) -> out`` sends each
    (token, expert) assignment to its expert and combines the weighted outputs per token. ``None`` runs every expert
    here (``run_experts``); expert parallelism (``collie.distributed.expert_parallel``) keeps only this rank's
    experts in ``experts`` (a ModuleDict keyed by their global index) and dispatches with all-to-all."""
    weights_in_input_dtype = True  # Qwen casts the routing weights to the hidden dtype; Mixtral keeps fp32
    dispatch = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, self.num_experts, self.top_k = args.hidden_size, args.num_experts, args.num_experts_per_tok
        self.normalize = args.norm_topk_prob
        self.gate = nn.Linear(hidden, self.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, args.moe_intermediate_size_) for _ in range(self.num_experts))
        if args.shared_expert_intermediate_size:
            self.shared_expert = Expert(hidden, args.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = None
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (tokens, experts), routing weights and chosen experts (tokens, k) of flat tokens."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype) if self.weights_in_input_dtype else weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(flat)
        self.routing = (logits, chosen) if self.training else None
        out = (self.run_experts if self.dispatch is None else self.dispatch)(self, flat, weights, chosen)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(shape)


    @staticmethod
    def run_experts(block, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Every expert on its tokens, the outputs weighted and added per token in expert order."""
        out = torch.zeros_like(flat)
        for index, expert in enumerate(block.experts):
            # every expert runs, on zero tokens if none chose it, so that data parallelism sees every gradient
            slot, token = torch.where(chosen.T == index)
            y = expert(flat.index_select(0, token)) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class MixtralSparseMoE(SparseMoE):
    weights_in_input_dtype = False


class MoEDecoderLayer(DecoderLayer):
    mlp_class = SparseMoE


class MixtralDecoderLayer(DecoderLayer):
    mlp_class = MixtralSparseMoE


# --- auxiliary losses and metrics ------------------------------------------------------------------------------

def load_balancing_loss(routings: list, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` over all layers at once: num_experts × Σ_e (share of the top-k
    choices that went to e) × (mean router probability of e), both over every layer's (unmasked) tokens."""
    device = routings[0][0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    for logits, chosen in routings:
        probs = torch.softmax(logits, dim=-1).float()
        mask = torch.ones(logits.shape[0], device=device) if token_mask is None else token_mask
        counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(chosen.shape[1]))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(routings: list, token_mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over layers and (unmasked) tokens of logsumexp(router logits)²."""
    total, rows = 0.0, 0.0
    for logits, _ in routings:
        z = torch.logsumexp(logits.float(), dim=-1) ** 2
        mask = torch.ones_like(z) if token_mask is None else token_mask
        total, rows = total + (z * mask).sum(), rows + mask.sum()
    return total / rows


def expert_load_metrics(parts, reduce=None) -> dict:
    """``moe/load_max`` and ``moe/load_min``: the busiest and idlest expert's routed tokens over the mean, worst
    layer of this rank's parts (1.0 = perfect balance), from the last training forward of each MoE block; the
    counts are summed with ``reduce`` (the data-parallel sum) first. {} for a model without experts (every rank
    of a data-parallel group holds the same layers, so either all of them reduce or none does)."""
    blocks = [m for part in parts for m in part.modules() if isinstance(m, SparseMoE) and m.routing is not None]
    if not blocks:
        return {}
    counts = torch.stack([torch.bincount(b.routing[1].reshape(-1), minlength=b.num_experts).float()
                          for b in blocks])
    for block in blocks:  # taken: the router logits need not outlive the step
        block.routing = None
    if reduce is not None:
        counts = reduce(counts)
    load = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-9)
    return {"moe/load_max": float(load.max()), "moe/load_min": float(load.min())}


# --- the families -------------------------------------------------------------------------------------------------

class MoEForCausalLM(LlamaForCausalLM):
    """The shared decoder with a sparse MoE block as every layer's MLP; records its auxiliary loss in training."""
    layer_class = MoEDecoderLayer
    auxiliary_loss: torch.Tensor | None = None  # set by a training forward, taken by collie.loss.auxiliary_loss_sum

    def __init__(self, args: ModelArgs):
        if not args.num_experts:
            raise ConfigError(f"architecture {self.architecture} is a mixture of experts: set num_experts (the "
                              f"{self.architecture} cards do)")
        super().__init__(args)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(input_ids, position_ids, attention_mask, cache, document_ids)
        if self.training and (self.args.router_aux_loss_coef or self.args.router_z_loss_coef):
            self.auxiliary_loss = self.router_loss(attention_mask)
        return out

    def router_loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """router_aux_loss_coef × load-balancing loss + router_z_loss_coef × z-loss of the last forward, over the
        tokens ``attention_mask`` (2-D, 1 = token) marks, as transformers' loss with ``output_router_logits``."""
        routings = [m.routing for m in self.modules() if isinstance(m, SparseMoE) and m.routing is not None]
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask.reshape(-1).to(routings[0][0].device, torch.float32)
        loss = routings[0][0].new_zeros((), dtype=torch.float32)
        if self.args.router_aux_loss_coef:
            loss = loss + self.args.router_aux_loss_coef * load_balancing_loss(routings, self.args.num_experts, mask)
        if self.args.router_z_loss_coef:
            loss = loss + self.args.router_z_loss_coef * router_z_loss(routings, mask)
        return loss

    @classmethod
    def hf_moe_args(cls, config: dict, experts_key: str) -> dict:
        if config.get("router_jitter_noise"):
            raise ConfigError(f"router_jitter_noise={config['router_jitter_noise']}; collie routes without jitter "
                              f"(set it to 0)")
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise ConfigError("decoder_sparse_step/mlp_only_layers make some layers dense; collie's MoE families "
                              "have experts in every layer (decoder_sparse_step 1, no mlp_only_layers)")
        return {"num_experts": config.get(experts_key) or config.get("num_local_experts"),
                "num_experts_per_tok": config.get("num_experts_per_tok", 2),
                "router_aux_loss_coef": config.get("router_aux_loss_coef", 0.001)}

    @classmethod
    def hf_moe_config(cls, args: ModelArgs, experts_key: str) -> dict:
        # router_z_loss_coef is collie's own training setting: transformers has no such key
        return {experts_key: args.num_experts, "num_experts_per_tok": args.num_experts_per_tok,
                "router_aux_loss_coef": args.router_aux_loss_coef, "output_router_logits": False}


# Mixtral names: collie fragment → Mixtral fragment (the MoE block is block_sparse_moe, experts' linears w1/w3/w2).
_MIXTRAL_NAMES = ((".mlp.gate.", ".block_sparse_moe.gate."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                  (".down_proj.", ".w2."))
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.(gate|experts\.\d+\.\w+)\.weight")


@register_model("mixtral")
class MixtralForCausalLM(MoEForCausalLM):
    """Mistral's decoder (sliding window, no biases) with top-k routed SwiGLU experts as wide as
    intermediate_size, routing weights always renormalised."""
    hf_architecture = "MixtralForCausalLM"
    hf_model_type = "mixtral"
    layer_class = MixtralDecoderLayer

    def __init__(self, args: ModelArgs):
        if not args.norm_topk_prob or args.shared_expert_intermediate_size or args.moe_intermediate_size not in (
                None, args.intermediate_size):
            raise ConfigError("architecture mixtral renormalises the top-k weights (norm_topk_prob: true), has no "
                              "shared expert and experts as wide as intermediate_size (moe_intermediate_size: null)")
        super().__init__(args)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        return {"sliding_window": config.get("sliding_window"), **cls.hf_moe_args(config, "num_local_experts")}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias or args.o_bias or args.mlp_bias:
            raise ConfigError("architecture mixtral has no biases; set qkv_bias, o_bias and mlp_bias to false")
        return {"sliding_window": args.sliding_window, "router_jitter_noise": 0.0,
                **cls.hf_moe_config(args, "num_local_experts")}

    @classmethod
    def hf_source(cls, fqn: str, args: ModelArgs):
        return _mixtral_name(fqn), None

    @classmethod
    def hf_state_dict(cls, state: dict, args: ModelArgs) -> dict:
        return {_mixtral_name(fqn): tensor for fqn, tensor in state.items()}


def _mixtral_name(fqn: str) -> str:
    match = _EXPERT.fullmatch(fqn)
    if match is None:
        return fqn
    fqn = fqn.replace(".mlp.", ".block_sparse_moe.", 1)
    return fqn if match.group(1) == "gate" else _rename(fqn, _MIXTRAL_NAMES[1:])


class QwenMoEForCausalLM(MoEForCausalLM):
    """What Qwen2-MoE and Qwen3-MoE share: num_experts, moe_intermediate_size, norm_topk_prob (config keys of
    the same names) and Qwen's sliding-window keys."""

    @classmethod
    def hf_qwen_moe_args(cls, config: dict) -> dict:
        return {"moe_intermediate_size": config["moe_intermediate_size"],
                "norm_topk_prob": config.get("norm_topk_prob", False),
                "sliding_window": _qwen2_sliding_window(config), **cls.hf_moe_args(config, "num_experts")}

    @classmethod
    def hf_qwen_moe_config(cls, args: ModelArgs) -> dict:
        if args.sliding_window is not None:
            raise ConfigError(f"{cls.hf_architecture} checkpoints are saved without a sliding window here; set "
                              f"sliding_window: null")
        return {"moe_intermediate_size": args.moe_intermediate_size_, "norm_topk_prob": args.norm_topk_prob,
                "use_sliding_window": False, "sliding_window": None, "decoder_sparse_step": 1,
                "mlp_only_layers": [], **cls.hf_moe_config(args, "num_experts")}


@register_model("qwen2_moe")
class Qwen2MoeForCausalLM(QwenMoEForCausalLM):
    """Qwen2 (q/k/v biases) with routed experts plus a shared expert scaled by a sigmoid gate."""
    hf_architecture = "Qwen2MoeForCausalLM"
    hf_model_type = "qwen2_moe"

    def __init__(self, args: ModelArgs):
        if not args.shared_expert_intermediate_size:
            raise ConfigError("architecture qwen2_moe has a shared expert: set shared_expert_intermediate_size")
        super().__init__(args)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        return {"qkv_bias": config.get("qkv_bias", True),
                "shared_expert_intermediate_size": config["shared_expert_intermediate_size"],
                **cls.hf_qwen_moe_args(config)}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.o_bias or args.mlp_bias:
            raise ConfigError("architecture qwen2_moe has biases on q/k/v only; set o_bias and mlp_bias to false")
        return {"qkv_bias": args.qkv_bias, "shared_expert_intermediate_size": args.shared_expert_intermediate_size,
                **cls.hf_qwen_moe_config(args)}


@register_model("qwen3_moe")
class Qwen3MoeForCausalLM(QwenMoEForCausalLM):
    """Qwen3 (QK-norm, head_dim of its own) with routed experts and no shared expert."""
    hf_architecture = "Qwen3MoeForCausalLM"
    hf_model_type = "qwen3_moe"
    hf_qk_norm = True

    def __init__(self, args: ModelArgs):
        if not args.qk_norm or args.shared_expert_intermediate_size:
            raise ConfigError("architecture qwen3_moe normalizes queries and keys (qk_norm: true) and has no shared "
                              "expert (shared_expert_intermediate_size: null)")
        super().__init__(args)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        bias = config.get("attention_bias", False)
        return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias, **cls.hf_qwen_moe_args(config)}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias != args.o_bias or args.mlp_bias:
            raise ConfigError("architecture qwen3_moe has one attention_bias flag for q/k/v/o and no MLP biases")
        return {"attention_bias": args.qkv_bias, **cls.hf_qwen_moe_config(args)}
