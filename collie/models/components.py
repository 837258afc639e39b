"""Building blocks of a Llama-family decoder: RMSNorm, rotary embedding, attention, SwiGLU MLP, decoder layer.

Module and parameter names follow Hugging Face Llama (``self_attn.q_proj``, ``mlp.gate_proj``, …) so that
checkpoints load by name and tensor-parallel plans can address modules by the same names. Head counts are
read from tensor shapes in ``forward`` so that column-sharded projections work unchanged.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from collie.models.args import ModelArgs
from collie.models.attention_kernels import DocumentSegments, scaled_dot_product_attention, softcapped_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as in transformers' LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, CPU) and the cos/sin scale of the configured rotary embedding.

    The default rope is computed here; scaled types reuse transformers' ``ROPE_INIT_FUNCTIONS`` so that they
    match Hugging Face exactly. ``dynamic`` yields the unscaled frequencies, exact up to
    ``max_position_embeddings`` (longer inputs are refused in ``RotaryEmbedding.forward``). ``seq_len``: the
    length the frequencies are for (longrope's long factors beyond ``original_max_position_embeddings``).
    """
    dim = args.head_dim_
    with torch.device("cpu"):  # the caller may be inside a meta-device context
        if args.rope_scaling is None:
            return 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        config = LlamaConfig(hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                             head_dim=dim, max_position_embeddings=args.max_position_embeddings,
                             rope_parameters={**args.rope_scaling, "rope_theta": args.rope_theta})
        inv_freq, scale = ROPE_INIT_FUNCTIONS[args.rope_scaling["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotary embedding for given positions, computed in fp32 like transformers.

    ``inv_freq`` is a non-persistent buffer derived from the arguments: it is recomputed (in fp32) whenever
    the module is moved or cast, so ``to_empty`` and ``.to(bfloat16)`` leave it exact. longrope keeps a second
    set, ``long_inv_freq``, which a forward uses for every position when its largest position reaches past
    ``original_max_position_embeddings`` (transformers' rule, without a host sync).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", torch.empty(args.head_dim_ // 2), persistent=False)
        self.long_after = None  # longrope: the last position of the short factors
        if args.rope_scaling and args.rope_scaling["rope_type"] == "longrope":
            self.long_after = args.rope_scaling["original_max_position_embeddings"]
        long_inv_freq = None if self.long_after is None else torch.empty(args.head_dim_ // 2)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.inv_freq.is_meta:
            return
        inv_freq, self.attention_scaling = rope_inv_freq(self.args)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        if self.long_after is not None:
            self.long_inv_freq = rope_inv_freq(self.args, self.long_after + 1)[0].to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                past_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        scaling, length = self.args.rope_scaling, past_len + position_ids.shape[-1]
        if scaling and scaling["rope_type"] == "dynamic" and length > self.args.max_position_embeddings:
            raise ValueError(f"dynamic rope scaling is implemented up to max_position_embeddings="
                             f"{self.args.max_position_embeddings}; got {length} positions")
        inv_freq = self.inv_freq
        if self.long_after is not None:  # one set for the whole batch, chosen by its largest position
            inv_freq = torch.where(position_ids.max() >= self.long_after, self.long_inv_freq, inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by cos/sin of shape (batch, seq, head_dim)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def build_attention_mask(padding_mask: torch.Tensor | None, seq_len: int, sliding_window: int | None,
                         device: torch.device, past_len: int = 0) -> torch.Tensor | None:
    """Boolean (batch|1, 1, seq, past+seq) mask of allowed keys, or None when plain causal attention is exact.

    ``padding_mask`` is the Hugging Face 2-D mask over all past+seq positions (1 = token, 0 = padding), or a
    boolean (batch, 1, seq, seq) mask of allowed keys that is combined with causality (and the sliding window).
    A mask with only right padding keeps the causal fast path: real tokens never see the padding after them
    (outputs at padding positions are unspecified). Query rows that would see no key at all (left padding)
    attend to themselves, which keeps them finite. ``past_len`` counts the cached positions before these
    ``seq_len`` queries; SDPA's ``is_causal`` aligns to the top left, so any cache needs an explicit mask.
    """
    total = past_len + seq_len
    windowed = sliding_window is not None and total > sliding_window
    full_mask = padding_mask is not None and padding_mask.dim() == 4
    if not past_len and not windowed and not full_mask and (padding_mask is None or is_right_padded(padding_mask)):
        return None
    query, key = torch.arange(past_len, total, device=device)[:, None], torch.arange(total, device=device)[None]
    allowed = key <= query
    if windowed:
        allowed &= key > query - sliding_window
    allowed = allowed[None, None]
    if full_mask:  # the caller's own (batch, 1, seq, seq) mask, e.g. per-document attention of packed data
        return allowed & padding_mask.bool()
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, None, :]
        allowed = allowed | (key == query)
    return allowed


def is_right_padded(padding_mask: torch.Tensor) -> bool:
    mask = padding_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class LayerKV:
    """One layer's cached keys and values, (batch, kv_heads, positions, head_dim) each."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; returns those of all positions so far."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Keys and values of the tokens already seen, per decoder layer, for incremental decoding.

    Pass one (empty) to the model's ``forward(..., cache=)`` with the prompt, then again with each new token
    only; every attention layer appends to its ``LayerKV``. Training never builds one.
    """

    def __init__(self):
        self.layers: dict[str, LayerKV] = {}

    def layer(self, name: str) -> LayerKV:
        return self.layers.setdefault(name, LayerKV())

    @property
    def length(self) -> int:
        """Positions cached so far (0 before the first forward)."""
        first = next(iter(self.layers.values()), None)
        return 0 if first is None or first.k is None else first.k.shape[2]


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, rotary positions and ``scaled_dot_product_attention``.
    ``norm_class``: the QK-norm's norm."""
    norm_class = RMSNorm

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, head_dim = args.hidden_size, args.head_dim_
        self.head_dim, self.qk_norm = head_dim, args.qk_norm
        self.q_proj = nn.Linear(hidden, args.num_attention_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(hidden, args.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(hidden, args.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_attention_heads * head_dim, hidden, bias=args.o_bias)
        if args.qk_norm:  # each head's queries and keys, over head_dim
            self.q_norm = self.norm_class(head_dim, args.rms_norm_eps)
            self.k_norm = self.norm_class(head_dim, args.rms_norm_eps)
        self.scale = args.query_pre_attn_scalar ** -0.5 if args.query_pre_attn_scalar else None
        self.softcap = args.attn_logit_softcapping

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | DocumentSegments | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        """``mask``: None (causal), a boolean mask of allowed keys, or the documents of packed rows."""
        batch, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        out = mask.attend(q, k, v, self.kernel) if isinstance(mask, DocumentSegments) else self.kernel(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of (batch, heads, q, d) queries over (batch, kv_heads, k, d) keys/values after rotary: SDPA,
        or with ``attn_logit_softcapping`` the soft-capped scores (a kernel of its own)."""
        if self.softcap is not None:
            return softcapped_attention(q, k, v, mask, self.scale or self.head_dim ** -0.5, self.softcap)
        return scaled_dot_product_attention(q, k, v, mask, self.scale)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as (batch, seq, heads, head_dim), before rotary positions (RMS-normalized
        per head with ``qk_norm``): the hook for attention variants (see examples/custom_model.py)."""
        batch, seq, _ = x.shape
        q, k, v = (proj(x).view(batch, seq, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) · up(x)) — SwiGLU (silu) or GeGLU (``hidden_act``)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, inner = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=args.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=args.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP.

    The per-family pieces are class attributes (``attention_class``, ``mlp_class``): a family subclasses the layer
    and sets its model's ``layer_class``. ``index`` is the layer's position, for families whose layers differ
    (``sliding_window``: this layer's attention window, None = full causal; the model builds one mask per window)."""
    attention_class = Attention
    mlp_class = MLP
    norm_class = RMSNorm  # also the model's final norm

    def __init__(self, args: ModelArgs, index: int = 0):
        super().__init__()
        sliding = args.layer_types is None or args.layer_types[index] == "sliding_attention"
        self.sliding_window = args.sliding_window if sliding else None
        self.self_attn = self.attention_class(args)
        self.mlp = self.mlp_class(args)
        norm = partial(self.norm_class, args.hidden_size, args.rms_norm_eps)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.sandwich = args.sandwich_norms
        if self.sandwich:  # post_attention_layernorm then normalises the attention's output
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        # cache by keyword: sequence-parallel plans prepare self_attn's four positional inputs
        attention = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache)
        if not self.sandwich:
            x = x + attention
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attention)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
