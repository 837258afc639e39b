"""Gemma 2 on collie's shared decoder.

Everything that makes Gemma 2 differ from Llama is a ``ModelArgs`` setting of the shared decoder — GeGLU
(``hidden_act``), sandwich norms, embeddings scaled by sqrt(hidden), its own attention scale
(``query_pre_attn_scalar``), soft-capped attention scores and logits, layers alternating between a sliding
window and full attention (``layer_types``) — except its norm, whose gain is 1 + weight. This file holds that
norm and the Hugging Face config mapping; the weight names are Llama's.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from collie.errors import ConfigError
from collie.models.args import ModelArgs
from collie.models.components import DecoderLayer, RMSNorm
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


class GemmaDecoderLayer(DecoderLayer):
    norm_class = GemmaRMSNorm


def alternating_layer_types(num_layers: int) -> list[str]:
    """Gemma 2's default: sliding-window attention in even layers, full attention in odd ones."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


@register_model("gemma2")
class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2: sandwich norms with 1 + weight gains, GeGLU, scaled embeddings, soft-capped attention and logits,
    alternating sliding/full attention layers (filled in when a windowed card leaves ``layer_types`` null)."""
    hf_architecture = "Gemma2ForCausalLM"
    hf_model_type = "gemma2"
    layer_class = GemmaDecoderLayer

    def __init__(self, args: ModelArgs):
        if not (args.sandwich_norms and args.scale_embeddings):
            raise ConfigError("architecture gemma2 needs sandwich_norms: true and scale_embeddings: true (see "
                              "models/gemma2-2b.yaml)")
        if args.sliding_window is not None and args.layer_types is None:
            args = dataclasses.replace(args, layer_types=alternating_layer_types(args.num_hidden_layers))
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
