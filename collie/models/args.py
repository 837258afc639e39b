"""Architecture hyper-parameters of a Llama-family decoder, named as in Hugging Face configs.

Model cards (``models/*.yaml``) and ``config.json`` files both become a ``ModelArgs``. Optional fields that
default to another field (``num_key_value_heads``, ``head_dim``) stay ``None`` so that overriding the field
they follow keeps them consistent; read the resolved values from ``n_kv_heads`` and ``head_dim_``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from collie.errors import ConfigError

# Keys each rope_scaling type needs besides "rope_type" (Hugging Face names).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # Phi-3 128k / Phi-3.5: per-frequency factors, the short ones up to original_max_position_embeddings
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def _f(default, help: str, **bounds):
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class ModelArgs:
    """The shape of a decoder-only transformer with RMSNorm, rotary embeddings, GQA and SwiGLU."""
    architecture: str = _f("llama", "registered architecture (llama, mistral, qwen2, qwen3, internlm2, phi3 or a "
                                    "user's)")
    vocab_size: int = _f(32000, "number of token embeddings", min=1)
    hidden_size: int = _f(4096, "width of the residual stream", min=1)
    intermediate_size: int = _f(11008, "width of the SwiGLU feed-forward layer", min=1)
    num_hidden_layers: int = _f(32, "number of decoder layers", min=1)
    num_attention_heads: int = _f(32, "number of query heads", min=1)
    num_key_value_heads: Optional[int] = _f(None, "number of key/value heads (GQA); null = num_attention_heads",
                                            min=1)
    head_dim: Optional[int] = _f(None, "width of one attention head; null = hidden_size / num_attention_heads",
                                 min=2)
    max_position_embeddings: int = _f(2048, "longest sequence the model is meant for", min=1)
    rms_norm_eps: float = _f(1e-6, "epsilon of the RMSNorm layers", min=0.0)
    rope_theta: float = _f(10000.0, "base of the rotary embedding frequencies", min=1.0)
    rope_scaling: Optional[dict] = _f(None, "rotary scaling in Hugging Face format, e.g. {rope_type: llama3, "
                                            "factor: 8.0, ...}; types: " + ", ".join(ROPE_SCALING_KEYS))
    rope_local_theta: Optional[float] = _f(None, "rotary base of the sliding-window layers, unscaled (Gemma 3: "
                                                 "10000); null = rope_theta and rope_scaling for every layer",
                                           min=1.0)
    qkv_bias: bool = _f(False, "bias in the query/key/value projections (Qwen2)")
    o_bias: bool = _f(False, "bias in the attention output projection")
    mlp_bias: bool = _f(False, "bias in the feed-forward projections")
    qk_norm: bool = _f(False, "RMSNorm over head_dim on each query and key head before rotary (Qwen3)")
    tie_word_embeddings: bool = _f(False, "lm_head shares its weight with the token embeddings")
    sliding_window: Optional[int] = _f(None, "attend only to the last N tokens (Mistral); null = full causal",
                                       min=1)
    layer_types: Optional[list[str]] = _f(None, "per layer: sliding_attention (uses sliding_window) or "
                                                "full_attention; null = every layer uses sliding_window (Gemma 2: "
                                                "alternating, from its config)")
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = _f("silu", "gate activation of the gated MLP: silu "
                                                                  "(SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma)")
    sandwich_norms: bool = _f(False, "also normalise each block's output before the residual add (Gemma 2/3: "
                                     "post-attention and pre/post-feedforward norms)")
    scale_embeddings: bool = _f(False, "multiply token embeddings by sqrt(hidden_size) (Gemma)")
    query_pre_attn_scalar: Optional[float] = _f(None, "attention scores scale by query_pre_attn_scalar^-0.5; "
                                                      "null = head_dim (Gemma 2 sets its own)", greater_than=0.0)
    attn_logit_softcapping: Optional[float] = _f(None, "cap attention scores at ±c by c·tanh(s/c) (Gemma 2); "
                                                       "null = off", greater_than=0.0)
    final_logit_softcapping: Optional[float] = _f(None, "cap the output logits the same way (Gemma 2); null = off",
                                                  greater_than=0.0)
    initializer_range: float = _f(0.02, "standard deviation of the random weight init", min=0.0)
    bos_token_id: Optional[int] = _f(1, "beginning-of-sequence token id", min=0)
    eos_token_id: Optional[int] = _f(2, "end-of-sequence token id", min=0)
    pad_token_id: Optional[int] = _f(None, "padding token id", min=0)
    # mixture of experts (collie/models/moe.py): every layer's MLP becomes a routed sparse MoE block
    num_experts: Optional[int] = _f(None, "routed experts per layer (HF num_local_experts / num_experts); null = "
                                          "dense MLP", min=1)
    num_experts_per_tok: int = _f(2, "experts each token is routed to (top-k)", min=1)
    moe_intermediate_size: Optional[int] = _f(None, "width of one expert's SwiGLU; null = intermediate_size "
                                                    "(Mixtral)", min=1)
    shared_expert_intermediate_size: Optional[int] = _f(None, "width of the always-on shared expert, scaled by a "
                                                              "sigmoid gate (Qwen2-MoE); null = none", min=1)
    norm_topk_prob: bool = _f(True, "renormalise the top-k routing probabilities to sum to 1 (Mixtral: always; "
                                    "Qwen-MoE: from the config)")
    router_aux_loss_coef: float = _f(0.0, "weight of the load-balancing loss (transformers' "
                                          "load_balancing_loss_func) added to the training loss", min=0.0)
    router_z_loss_coef: float = _f(0.0, "weight of the router z-loss (mean squared logsumexp of router logits) "
                                        "added to the training loss", min=0.0)

    def __post_init__(self):
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; change one of them or set head_dim")
        if self.num_attention_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.n_kv_heads}")
        if self.head_dim_ % 2:
            raise ConfigError(f"head_dim={self.head_dim_} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            self.rope_scaling = normalize_rope_scaling(self.rope_scaling)
            check_longrope_factors(self.rope_scaling, self.head_dim_)
        if self.num_experts is not None and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts="
                              f"{self.num_experts}; choose at most {self.num_experts}")
        if self.layer_types is not None:
            kinds = ("sliding_attention", "full_attention")
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(kinds):
                raise ConfigError(f"layer_types must list {self.num_hidden_layers} entries (num_hidden_layers), each "
                                  f"one of {', '.join(kinds)}; got {self.layer_types}")

    @property
    def n_kv_heads(self) -> int:
        """Number of key/value heads, resolved."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim_(self) -> int:
        """Width of one attention head, resolved."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def num_params(self) -> int:
        """Number of parameters of the model these arguments build (tied embeddings counted once)."""
        hidden = self.hidden_size
        q_width, kv_width = self.num_attention_heads * self.head_dim_, self.n_kv_heads * self.head_dim_
        attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
        attention += (q_width + 2 * kv_width) * self.qkv_bias + hidden * self.o_bias + 2 * self.head_dim_ * self.qk_norm
        mlp = 3 * hidden * self.intermediate_size + (2 * self.intermediate_size + hidden) * self.mlp_bias
        if self.num_experts:
            mlp = self.moe_layer_params()
        layer = attention + mlp + (4 if self.sandwich_norms else 2) * hidden
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embeddings + hidden

    @property
    def moe_intermediate_size_(self) -> int:
        """Width of one routed expert, resolved."""
        return self.moe_intermediate_size or self.intermediate_size

    def moe_layer_params(self) -> int:
        """Parameters of one sparse MoE block: router, routed experts, shared expert and its gate."""
        hidden, shared = self.hidden_size, self.shared_expert_intermediate_size
        experts = self.num_experts * 3 * hidden * self.moe_intermediate_size_
        return hidden * self.num_experts + experts + (3 * hidden * shared + hidden if shared else 0)


def check_longrope_factors(scaling: dict | None, head_dim: int) -> None:
    """longrope scales each of the head_dim / 2 rotary frequencies by its own factor."""
    if scaling is None or scaling["rope_type"] != "longrope":
        return
    for key in ("short_factor", "long_factor"):
        if len(scaling[key]) != head_dim // 2:
            raise ConfigError(f"rope_scaling.{key} has {len(scaling[key])} entries; longrope needs one per rotary "
                              f"frequency: head_dim / 2 = {head_dim // 2}")


def normalize_rope_scaling(scaling: dict) -> Optional[dict]:
    """Validated HF rope_scaling with "rope_type" (older configs say "type"); None for the default rope."""
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", None))
    scaling.pop("rope_theta", None)  # transformers 5 keeps theta here; ModelArgs has its own field
    if rope_type in (None, "default"):
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope_scaling.rope_type={rope_type!r} is not supported; choose default, "
                          + ", ".join(ROPE_SCALING_KEYS))
    missing = [key for key in ROPE_SCALING_KEYS[rope_type] if key not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    return {"rope_type": rope_type, **scaling}
