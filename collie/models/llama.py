"""One config-driven decoder for Llama, Mistral, Qwen2, Qwen3, InternLM2 and Phi-3.

The architectures differ only in ``ModelArgs`` (biases, QK-norm, sliding window, rope) and in how their Hugging
Face ``config.json`` and weight names map to collie's (fused projections are split on load and fused on save);
the module code is shared. The model knows nothing of
parallelism: ``layers`` is a ModuleDict keyed "0".."n-1" so that a pipeline stage can delete layers and keep
parameter names, and with ``embed_tokens`` / ``norm`` / ``lm_head`` set to None a stage takes or returns
hidden states. The loss is computed outside the model.
"""
from __future__ import annotations

import re
from dataclasses import replace
import zlib
from functools import partial

import torch
from torch import nn

from collie.errors import ConfigError
from collie.models.args import ModelArgs
from collie.models.attention_kernels import DocumentSegments
from collie.models.components import (DecoderLayer, KVCache, RotaryEmbedding, build_attention_mask,
                                      is_right_padded)
from collie.models.hf_io import StackedRows
from collie.models.registry import register_model
from collie.schema import from_dict

# config.json keys that have the same name and meaning in ModelArgs.
_HF_SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                   "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
_HF_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm; returns hidden states."""

    def __init__(self, args: ModelArgs, layer_class: type = DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict({str(i): layer_class(args, i) for i in range(args.num_hidden_layers)})
        self.norm = layer_class.norm_class(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)
        self.local_rotary_emb = None  # the sliding-window layers' own rotary base (Gemma 3)
        if args.rope_local_theta is not None:
            self.local_rotary_emb = RotaryEmbedding(replace(args, rope_theta=args.rope_local_theta, rope_scaling=None))
        self.embed_scale = args.hidden_size ** 0.5 if args.scale_embeddings else None

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = tokens if self.embed_tokens is None else self.embed_tokens(tokens)
        if self.embed_tokens is not None and self.embed_scale is not None:  # rounded to the dtype, as Gemma does
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        seq_len = h.shape[1] if position_ids is None else position_ids.shape[-1]  # h may be sequence-sharded
        past_len = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=h.device)[None]
        ropes = {None: self.rotary_emb(position_ids, h.dtype, past_len)}  # layer's local rope or not → cos, sin
        if self.local_rotary_emb is not None:
            ropes["local"] = self.local_rotary_emb(position_ids, h.dtype, past_len)
        masks = {}  # one per attention window of this stage's layers; packed documents are read once
        segments = None if document_ids is None else document_segments(document_ids, attention_mask, cache)
        for window in {layer.sliding_window for layer in self.layers.values()}:
            if segments is None:
                masks[window] = build_attention_mask(attention_mask, seq_len, window, h.device, past_len)
            else:
                masks[window] = segments.with_window(window)
        for name, layer in self.layers.items():
            local = "local" if self.local_rotary_emb is not None and layer.sliding_window is not None else None
            h = layer(h, *ropes[local], masks[layer.sliding_window], cache=None if cache is None else cache.layer(name))
        return h if self.norm is None else self.norm(h)


@register_model("llama")
class LlamaForCausalLM(nn.Module):
    """Decoder-only language model: ``forward(input_ids) -> logits`` of shape (batch, seq, vocab)."""
    hf_architecture = "LlamaForCausalLM"
    hf_model_type = "llama"
    layer_class = DecoderLayer  # a family's decoder layer (its attention, MLP or MoE block, norm placement)
    hf_qk_norm = False  # whether the checkpoint format has q_norm/k_norm weights

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, self.layer_class)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for token ids (or hidden states when ``embed_tokens`` is None).

        ``position_ids``: (batch|1, seq), default 0..seq-1 after any cached positions. ``attention_mask``:
        Hugging Face 2-D padding mask over cached and new positions (1 = token, 0 = padding, left padding
        allowed); None = every token is real (causal fast path). ``cache``: a ``KVCache`` for incremental
        decoding, which then takes only the new tokens. ``document_ids``: (batch, seq) document of each token of
        packed rows (right padding only, no cache); attention then stays inside each document.
        """
        h = self.model(input_ids, position_ids, attention_mask, cache, document_ids)
        return h if self.lm_head is None else self.logits(self.lm_head(h))

    def logits(self, head_output: torch.Tensor) -> torch.Tensor:
        """The LM head's output as logits: capped at ±c by c·tanh(x/c) with ``final_logit_softcapping``."""
        cap = self.args.final_logit_softcapping
        return head_output if cap is None else torch.tanh(head_output / cap) * cap

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tie_weights()  # to_empty() and casts replace parameters, which unties them
        return self

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init: normal(0, initializer_range) weights, zero biases, unit norms; recomputes rope buffers.

        Each parameter draws from its own generator seeded by ``seed`` and its name, so a pipeline stage that
        holds only some layers gets the same values as the whole model. ``seed=None`` draws from torch's RNG.
        """
        base = int(torch.randint(0, 2**31, ()).item()) if seed is None else seed
        done = set()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) not in done:
                    done.add(id(module.weight))
                    generator = _param_generator(base, f"{name}.weight", module.weight.device)
                    nn.init.normal_(module.weight, 0.0, self.args.initializer_range, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face directory (see ``collie.models.hf_io.save_pretrained``)."""
        from collie.models.hf_io import save_pretrained
        save_pretrained(self, path, **kwargs)

    # --- Hugging Face config.json and weight names ------------------------------------------------------

    @classmethod
    def args_from_hf(cls, config: dict, source: str = "config.json") -> ModelArgs:
        """ModelArgs from a Hugging Face config dict (transformers 4.x and 5.x rope formats)."""
        missing = [key for key in _HF_REQUIRED_KEYS if key not in config]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}")
        if config.get("hidden_act", "silu") not in ("silu", "gelu_pytorch_tanh"):
            raise ConfigError(f"{source}: hidden_act={config['hidden_act']!r}; collie implements silu (SwiGLU) "
                              f"and gelu_pytorch_tanh (GeGLU)")
        values = {key: config[key] for key in _HF_SHARED_KEYS if key in config}
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        values["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        values["rope_scaling"] = rope or None
        values["hidden_act"] = config.get("hidden_act", "silu")
        values.update(cls.hf_specific_args(config))
        return from_dict(ModelArgs, {**values, "architecture": cls.architecture}, source)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        """ModelArgs values this architecture reads from its own config keys (biases, window)."""
        bias = config.get("attention_bias", False)
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": config.get("mlp_bias", False)}

    @classmethod
    def hf_config(cls, args: ModelArgs) -> dict:
        """The Hugging Face config.json content (without dtype) for ``args``."""
        if args.qk_norm != cls.hf_qk_norm:
            raise ConfigError(f"{cls.hf_architecture} checkpoints {'need' if cls.hf_qk_norm else 'have no'} "
                              f"q_norm/k_norm weights, so qk_norm={args.qk_norm} cannot be saved as "
                              f"{cls.hf_model_type}; use architecture qwen3 for QK-norm")
        config = {"architectures": [cls.hf_architecture], "model_type": cls.hf_model_type}
        config.update({key: getattr(args, key) for key in _HF_SHARED_KEYS})
        config.update(num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim_, hidden_act=args.hidden_act,
                      rope_theta=args.rope_theta, rope_scaling=args.rope_scaling, attention_dropout=0.0,
                      use_cache=True)
        config.update(cls.hf_specific_config(args))
        return config

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias != args.o_bias:
            raise _bias_error(cls, args, "one attention_bias flag for the q/k/v/o projections")
        return {"attention_bias": args.qkv_bias, "mlp_bias": args.mlp_bias}

    @classmethod
    def hf_source(cls, fqn: str, args: ModelArgs):
        """(checkpoint key, transform or None) that produces collie parameter ``fqn``."""
        return fqn, None

    @classmethod
    def hf_state_dict(cls, state: dict, args: ModelArgs) -> dict:
        """collie state dict → Hugging Face names and layout."""
        return dict(state)


def document_segments(document_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      cache: KVCache | None) -> DocumentSegments:
    if cache is not None:
        raise ValueError("document_ids are for training and evaluation of packed rows; decoding with a cache "
                         "takes an attention_mask")
    if attention_mask is not None and (attention_mask.dim() != 2 or not is_right_padded(attention_mask)):
        raise ValueError("with document_ids, attention_mask may only mark right padding (a 2-D mask); padding "
                         "inside a row belongs in a document of its own")
    return DocumentSegments(document_ids)


def _param_generator(base: int, name: str, device: torch.device):
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(base + zlib.crc32(name.encode()))


def _bias_error(cls, args: ModelArgs, layout: str) -> ConfigError:
    return ConfigError(f"{cls.hf_architecture} checkpoints store {layout}, so qkv_bias={args.qkv_bias}, "
                       f"o_bias={args.o_bias}, mlp_bias={args.mlp_bias} cannot be saved as {cls.hf_model_type}; "
                       f"use architecture llama (attention and MLP biases) or qwen2 (q/k/v biases only)")


@register_model("mistral")
class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window."""
    hf_architecture = "MistralForCausalLM"
    hf_model_type = "mistral"

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        return {"sliding_window": config.get("sliding_window")}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias or args.o_bias or args.mlp_bias:
            raise _bias_error(cls, args, "no biases")
        return {"sliding_window": args.sliding_window}


@register_model("qwen2")
class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with biases on the query/key/value projections."""
    hf_architecture = "Qwen2ForCausalLM"
    hf_model_type = "qwen2"

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        return {"qkv_bias": True, "sliding_window": _qwen2_sliding_window(config)}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if (args.qkv_bias, args.o_bias, args.mlp_bias) != (True, False, False):
            raise _bias_error(cls, args, "q/k/v biases and no others")
        return _qwen_window_config(args)


@register_model("qwen3")
class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with QK-norm (RMSNorm over head_dim on each query and key head, before rotary) and no biases by
    default; head_dim is independent of hidden_size / num_attention_heads."""
    hf_architecture = "Qwen3ForCausalLM"
    hf_model_type = "qwen3"
    hf_qk_norm = True

    def __init__(self, args: ModelArgs):
        if not args.qk_norm:
            raise ConfigError("architecture qwen3 normalizes queries and keys: set qk_norm: true (the qwen3 cards "
                              "do)")
        super().__init__(args)

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        bias = config.get("attention_bias", False)
        return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias,
                "sliding_window": _qwen2_sliding_window(config)}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias != args.o_bias or args.mlp_bias:
            raise _bias_error(cls, args, "one attention_bias flag for the q/k/v/o projections and no MLP biases")
        return {"attention_bias": args.qkv_bias, **_qwen_window_config(args)}


def _qwen_window_config(args: ModelArgs) -> dict:
    """Qwen2/Qwen3 config.json keys of the sliding window: all layers slide, or none does."""
    window = args.sliding_window
    layer_type = "full_attention" if window is None else "sliding_attention"
    return {"use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0 if window else args.num_hidden_layers,
            "layer_types": [layer_type] * args.num_hidden_layers}


def _qwen2_sliding_window(config: dict) -> int | None:
    """The window when every layer slides, None when none does; mixed layers are not supported."""
    window, n_layers = config.get("sliding_window"), config["num_hidden_layers"]
    sliding = config.get("use_sliding_window", False) and window is not None
    types = config.get("layer_types") or [
        "sliding_attention" if sliding and i >= config.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return window
    raise ConfigError("layer_types mixes sliding and full attention layers, which collie does not support")


# InternLM2 names: collie/HF-Llama fragment → InternLM2 fragment (q/k/v are packed into attention.wqkv).
_INTERNLM2_NAMES = (("model.embed_tokens.", "model.tok_embeddings."), (".self_attn.o_proj.", ".attention.wo."),
                    (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
                    (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
                    (".post_attention_layernorm.", ".ffn_norm."), ("lm_head.", "output."))
_QKV = re.compile(r"(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


@register_model("internlm2")
class InternLM2ForCausalLM(LlamaForCausalLM):
    """Llama whose checkpoints use InternLM2 names and a packed, per-kv-group wqkv projection."""
    hf_architecture = "InternLM2ForCausalLM"
    hf_model_type = "internlm2"

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        bias = config.get("bias", True)  # InternLM2Config's default
        return {"qkv_bias": bias, "o_bias": bias}

    @classmethod
    def hf_config(cls, args: ModelArgs) -> dict:
        config = super().hf_config(args)
        if args.rope_scaling:  # InternLM2's modeling code reads the older "type" key
            config["rope_scaling"] = {"type": args.rope_scaling["rope_type"], **args.rope_scaling}
        return config

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias != args.o_bias or args.mlp_bias:
            raise _bias_error(cls, args, "one bias flag for wqkv and wo, and no MLP biases")
        return {"bias": args.qkv_bias}

    @classmethod
    def hf_source(cls, fqn: str, args: ModelArgs):
        match = _QKV.fullmatch(fqn)
        if match is None:
            return _rename(fqn, _INTERNLM2_NAMES), None
        prefix, part, kind = match.groups()
        return f"{prefix}.attention.wqkv.{kind}", partial(_unpack_wqkv, args=args, part=part)

    @classmethod
    def hf_state_dict(cls, state: dict, args: ModelArgs) -> dict:
        out = {}
        for fqn, tensor in state.items():
            match = _QKV.fullmatch(fqn)
            if match is None:
                out[_rename(fqn, _INTERNLM2_NAMES)] = tensor
            elif match.group(2) == "q":
                prefix, _, kind = match.groups()
                q, k, v = (state[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv")
                out[f"{prefix}.attention.wqkv.{kind}"] = _pack_wqkv(q, k, v, args)
        return out


def _rename(name: str, pairs) -> str:
    for old, new in pairs:
        if old in name:
            return name.replace(old, new, 1)
    return name


def _unpack_wqkv(wqkv: torch.Tensor, args: ModelArgs, part: str) -> torch.Tensor:
    """q, k or v out of InternLM2's wqkv, laid out as (kv_heads, q_per_kv + 2, head_dim, …): the group's
    query heads, then its key head, then its value head."""
    groups, rest = args.num_attention_heads // args.n_kv_heads, wqkv.shape[1:]
    packed = wqkv.reshape(args.n_kv_heads, groups + 2, args.head_dim_, *rest)
    piece = {"q": packed[:, :groups], "k": packed[:, groups], "v": packed[:, groups + 1]}[part]
    return piece.reshape(-1, *rest)


def _pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    kv_heads, rest = args.n_kv_heads, q.shape[1:]
    parts = [q.reshape(kv_heads, -1, args.head_dim_, *rest), k.reshape(kv_heads, 1, args.head_dim_, *rest),
             v.reshape(kv_heads, 1, args.head_dim_, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


# Phi-3 fuses projections that collie keeps apart: fused name → its parts, stacked along the output rows.
_PHI3_PART = re.compile(r"(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.gate_proj|mlp\.up_proj)\.weight")


@register_model("phi3")
class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window whose checkpoints fuse q/k/v into ``qkv_proj`` and gate/up into
    ``gate_up_proj``: split on load, fused again on save (collie's modules stay separate, so tensor parallel
    shards each part on its own)."""
    hf_architecture = "Phi3ForCausalLM"
    hf_model_type = "phi3"

    @classmethod
    def hf_specific_args(cls, config: dict) -> dict:
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise ConfigError(f"partial_rotary_factor={factor}; collie rotates whole heads (1.0)")
        return {"sliding_window": config.get("sliding_window"), "rope_scaling": _phi3_rope_scaling(config, rope)}

    @classmethod
    def hf_specific_config(cls, args: ModelArgs) -> dict:
        if args.qkv_bias or args.o_bias or args.mlp_bias:
            raise _bias_error(cls, args, "no biases")
        original = (args.rope_scaling or {}).get("original_max_position_embeddings", args.max_position_embeddings)
        return {"sliding_window": args.sliding_window, "original_max_position_embeddings": original}

    @classmethod
    def hf_source(cls, fqn: str, args: ModelArgs):
        match = _PHI3_PART.fullmatch(fqn)
        if match is None:
            return fqn, None
        prefix, part = match.groups()
        fused, parts = _phi3_fused(args)[part]
        names, rows = [name for name, _ in parts], [rows for _, rows in parts]
        start = sum(rows[:names.index(part)])
        return f"{prefix}.{fused}.weight", StackedRows(start, start + rows[names.index(part)], sum(rows))

    @classmethod
    def hf_state_dict(cls, state: dict, args: ModelArgs) -> dict:
        out, fused_of = {}, _phi3_fused(args)
        for fqn, tensor in state.items():
            match = _PHI3_PART.fullmatch(fqn)
            if match is None:
                out[fqn] = tensor
                continue
            prefix, part = match.groups()
            fused, parts = fused_of[part]
            if part == parts[0][0]:
                out[f"{prefix}.{fused}.weight"] = torch.cat([state[f"{prefix}.{name}.weight"] for name, _ in parts])
        return out


def _phi3_rope_scaling(config: dict, rope: dict) -> dict | None:
    """Phi-3's rope_scaling: "su" and "yarn" are its old names of longrope, whose pretraining length is the
    top-level original_max_position_embeddings (which transformers prefers to the one inside rope_scaling, and
    defaults to 4096 as Phi3Config does)."""
    rope = {key: value for key, value in rope.items() if key != "partial_rotary_factor"}
    if rope.get("rope_type", rope.get("type")) not in ("longrope", "su", "yarn"):
        return rope or None
    rope.pop("type", None)
    original = config.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", 4096))
    return {**rope, "rope_type": "longrope", "original_max_position_embeddings": original}


def _phi3_fused(args: ModelArgs) -> dict:
    """collie module → (Phi-3 fused module, its parts as (module, rows) in stored order)."""
    q, kv, inner = args.num_attention_heads * args.head_dim_, args.n_kv_heads * args.head_dim_, args.intermediate_size
    qkv = ("self_attn.qkv_proj", (("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)))
    gate_up = ("mlp.gate_up_proj", (("mlp.gate_proj", inner), ("mlp.up_proj", inner)))
    return {name: fused for fused in (qkv, gate_up) for name, _ in fused[1]}

