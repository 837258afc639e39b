"""Gemma 2 and Gemma 3 (text) on collie's shared decoder.

Everything that makes them differ from Llama is a ``ModelArgs`` setting of the shared decoder — GeGLU
(``hidden_act``), sandwich norms, embeddings scaled by sqrt(hidden), their own attention scale
(``query_pre_attn_scalar``), soft-capped attention scores and logits (Gemma 2), layers mixing a sliding window
and full attention (``layer_types``), QK-norm and a rotary base of the sliding layers' own (Gemma 3,
``rope_local_theta``) — except their norm, whose gain is 1 + weight. This file holds that norm and the Hugging
Face config mappings; the weight names are Llama's (Qwen3's for the QK-norm).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from collie.errors import ConfigError
from collie.models.args import ModelArgs
from collie.models.components import Attention, DecoderLayer, RMSNorm
from collie.models.llama import LlamaForCausalLM
from collie.models.registry import register_model


class GemmaRMSNorm(RMSNorm):
    """RMSNorm with gain 1 + weight (zero-initialised), scaled in fp32 before the cast back, as Gemma's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class GemmaAttention(Attention):
    norm_class = GemmaRMSNorm  # of the QK-norm (Gemma 3)


class GemmaDecoderLayer(DecoderLayer):
    attention_class = GemmaAttention
    norm_class = GemmaRMSNorm


def patterned_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Gemma's default: full attention in every ``pattern``-th layer (Gemma 2: 2, Gemma 3: 6), a sliding window in
    the others."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


@register_model("gemma2")
class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2: sandwich norms with 1 + weight gains, GeGLU, scaled embeddings, soft-capped attention and logits,
    alternating sliding/full attention layers (filled in when a windowed card leaves ``layer_types`` null)."""
    hf_architecture = "Gemma2ForCausalLM"
    hf_model_type = "gemma2"
    layer_class = GemmaDecoderLayer
    sliding_window_pattern = 2

    def __init__(self, args: ModelArgs):
        if not (args.sandwich_norms and args.scale_embeddings):
            raise ConfigError(f"architecture {self.hf_model_type} needs sandwich_norms: true and scale_embeddings: "
                              f"true (see models/gemma2-2b.yaml)")
        if args.sliding_window is not None and args.layer_types is None:
            args = dataclasses.replace(args, layer_types=patterned_layer_types(args.num_hidden_layers,
                                                                                self.sliding_window_pattern))
        super().__init__(args)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        bias = config.get("attention_bias", False)
        return {"qkv_bias": bias, "o_bias": bias, "hidden_act": config.get("hidden_activation", "gelu_pytorch_tanh"),
                "sandwich_norms": True, "scale_embeddings": True, "sliding_window": config.get("sliding_window"),
                "layer_types": config.get("layer_types"), "query_pre_attn_scalar": config.get("query_pre_attn_scalar"),
                "attn_logit_softcapping": config.get("attn_logit_softcapping"),
                "final_logit_softcapping": config.get("final_logit_softcapping")}

    @classmethod
    def hf_config(cls, args: ModelArgs) -> dict:
        config = super().hf_config(args)
        config["hidden_activation"] = config.pop("hidden_act")
        return config

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        scalar = args.query_pre_attn_scalar
        if scalar is not None and scalar != round(scalar):
            raise ConfigError(f"query_pre_attn_scalar={scalar} cannot be saved as gemma2, whose config holds an int")
        if args.qkv_bias != args.o_bias or args.mlp_bias:
            raise ConfigError(f"Gemma2ForCausalLM checkpoints store one attention_bias flag and no MLP biases, so "
                              f"qkv_bias={args.qkv_bias}, o_bias={args.o_bias}, mlp_bias={args.mlp_bias} cannot be "
                              f"saved as gemma2")
        return {"attention_bias": args.qkv_bias, "sliding_window": args.sliding_window,
                "layer_types": args.layer_types,
                "query_pre_attn_scalar": round(args.query_pre_attn_scalar or args.head_dim_),  # an int in Gemma2Config
                "attn_logit_softcapping": args.attn_logit_softcapping,
                "final_logit_softcapping": args.final_logit_softcapping}


@register_model("gemma3")
class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 (text): Gemma 2 without soft-capping, with QK-norm (1 + weight gains), full attention in every 6th
    layer, and sliding layers that take their own unscaled rotary base (``rope_local_theta``)."""
    hf_architecture = "Gemma3ForCausalLM"
    hf_model_type = "gemma3_text"
    hf_qk_norm = True
    sliding_window_pattern = 6

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        values = super().hf_specific_args(config)
        ropes = config.get("rope_parameters") or {}
        full, local = dict(ropes.get("full_attention") or {}), dict(ropes.get("sliding_attention") or {})
        values.update(qk_norm=True, rope_theta=full.pop("rope_theta", 1_000_000.0),
                      rope_local_theta=local.get("rope_theta", 10_000.0),
                      rope_scaling=full if full.get("rope_type", "default") != "default" else None)
        return values

    @classmethod
    def hf_config(cls, args: ModelArgs) -> dict:
        config = super().hf_config(args)
        del config["rope_theta"], config["rope_scaling"]
        local = args.rope_local_theta or args.rope_theta
        config["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": local},
                                     "full_attention": {**(args.rope_scaling or {"rope_type": "default"}),
                                                        "rope_theta": args.rope_theta}}
        return config
