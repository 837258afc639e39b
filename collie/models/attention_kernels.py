"""How attention is computed: causal or masked SDPA with grouped key/value heads, and attention inside packed
documents without a (seq × seq) mask.

A packed row holds several documents, and a token attends only to the earlier tokens of its own document.
A dense boolean mask costs O(seq²) memory and forces SDPA's masked kernels; here each row is cut into its
documents and every document runs plain causal attention on its own: flash kernels, keys/values read per
query group (no repeated heads), Σ lenᵢ² work instead of seq², memory linear in seq. A sliding window
(Mistral) composes: a document longer than the window gets a band mask of its own length only.

FlexAttention would express the same mask as a block mask, but it has no backward on CPU in torch 2.13, and
per-document SDPA already skips every masked block; on CUDA the same loop calls the flash kernel per document.
"""
from __future__ import annotations

import copy

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DocumentSegments:
    """The document lengths of every row, read once per forward from (batch, seq) ``document_ids`` (equal ids
    on consecutive tokens = one document), and attention that stays inside them."""

    def __init__(self, document_ids: torch.Tensor, sliding_window: int | None = None):
        ids = torch.atleast_2d(document_ids)
        seq_len = ids.shape[1]
        starts = (ids[:, 1:] != ids[:, :-1]).nonzero().tolist()  # one host sync per forward, not per layer
        bounds = [[0] for _ in range(ids.shape[0])]
        for row, index in starts:
            bounds[row].append(index + 1)
        self.lengths = [[b - a for a, b in zip(row, row[1:] + [seq_len])] for row in bounds]
        self.sliding_window = sliding_window

    def with_window(self, sliding_window: int | None) -> DocumentSegments:
        """The same documents under another attention window, without reading the ids again (layers that mix
        sliding and full attention share one read per forward)."""
        segments = copy.copy(self)
        segments.sliding_window = sliding_window
        return segments

    @torch.compiler.disable  # Python loop over data-dependent lengths: a graph break, not a recompile per batch
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel=None) -> torch.Tensor:
        """Causal attention per document: q (batch, heads, seq, d), k/v (batch, kv_heads, seq, d); ``kernel``
        (q, k, v, mask) attends one document (default ``scaled_dot_product_attention``)."""
        kernel = kernel or scaled_dot_product_attention
        rows = []
        for lengths, qr, kr, vr in zip(self.lengths, q.split(1), k.split(1), v.split(1)):
            pieces = zip(qr.split(lengths, 2), kr.split(lengths, 2), vr.split(lengths, 2))
            rows.append(torch.cat([kernel(*piece, self._window_mask(piece[0])) for piece in pieces], 2))
        return torch.cat(rows)

    def _window_mask(self, q: torch.Tensor) -> torch.Tensor | None:
        """None (causal) or, for a document longer than the window, its band of allowed keys."""
        length, window = q.shape[2], self.sliding_window
        if window is None or length <= window:
            return None
        index = torch.arange(length, device=q.device)
        return (index[None] <= index[:, None]) & (index[None] > index[:, None] - window)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Causal SDPA (``mask`` None) or SDPA with a boolean mask of allowed keys, with grouped key/value heads.

    Flash kernels (causal on every device, masked on CPU) read each key/value head for its query group; CUDA's
    memory-efficient kernel, which takes the masks there, has no GQA mode, so only that path repeats heads.
    ``scale``: of the scores, default head_dim^-0.5."""
    n_rep = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1, scale=scale)
    if q.device.type == "cpu" or n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1, scale=scale)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=scale)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, softcap: float) -> torch.Tensor:
    """Attention whose scores are capped at ±softcap by softcap·tanh(s/softcap) before masking (Gemma 2), as
    transformers computes it: no SDPA kernel takes a cap, so the scores are materialised. Query heads are
    grouped per key/value head by a broadcasting matmul, without repeated keys/values. ``mask`` as in
    ``scaled_dot_product_attention`` (None: causal, aligned to the last query and key)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, q_len, dim)
    scores = grouped @ k[:, :, None].transpose(-2, -1) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    mask = mask if mask.dim() == 2 else mask[:, :, None]  # (batch|1, 1, 1, q, k) against the grouped heads
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return (weights @ v[:, :, None]).reshape(batch, heads, q_len, dim)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) → (batch, kv_heads·n_rep, seq, d), for SDPA kernels without a GQA mode."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class QuerySegment(NamedTuple):
    """Queries ``start`` … ``start``+length−1 of row ``row`` (None: every row), which are the keys ``position`` …
    ``position``+length−1 and attend every key from ``first_key`` (their document's start, or 0) up to their own."""
    row: int | None
    start: int
    length: int
    first_key: int
    position: int


class _Band(NamedTuple):
    """The keys ``lo`` … ``hi``−1 that only some queries of a segment see under a sliding window."""
    lo: int
    hi: int


@torch.compiler.disable  # Python loop over data-dependent segments: a graph break, not a recompile per packing
def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[QuerySegment],
                             scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention of query segments that sit elsewhere among the keys — the split of context parallelism.
    ``q`` (batch, heads, n, d) over (batch, kv_heads, S, d) keys/values; the ``segments`` cover every query once;
    with a sliding ``window`` a query sees only the last ``window`` keys, and no segment may be longer than it.

    No (queries × keys) mask is built: a segment runs CPU flash attention over its own block of keys causally and
    over the keys before it fully — with a window, the keys that only some of its queries see form a band of at
    most length × length, the one block with a mask — and the results are merged by their log-sum-exps (the merge
    of ring attention). Only q, k, v, the output and the log-sum-exp are saved; backward recomputes each block."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))  # under autocast rotary leaves q/k in fp32, v is autocast's
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ChunkedCausalAttention.apply(q, k, v, tuple(segments), scale, window)


class _ChunkedCausalAttention(torch.autograd.Function):
    """Forward and backward of ``chunked_causal_attention`` on aten's CPU flash-attention kernels, whose backward
    takes the output and log-sum-exp of the *whole* attention: given the merged ones, the gradient of each block
    is exact."""

    @staticmethod
    def forward(ctx, q, k, v, segments, scale, window):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
        for segment in segments:
            queries, blocks = _segment_blocks(segment, window)
            parts = []
            for keys, causal, band in blocks:
                block_out, block_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[queries], k[keys], v[keys], 0.0, causal, attn_mask=_band_mask(segment, band, window, q.dtype),
                    scale=scale)
                if band is not None:  # a row that sees none of the band: the kernel gives it 0, not -inf
                    block_lse = block_lse.masked_fill(_unseen(segment, band, window), float("-inf"))
                parts.append((block_out, block_lse))
            lse[queries] = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), 0)
            out[queries] = sum(part_out.to(lse.dtype) * (part_lse - lse[queries]).exp()[..., None]
                               for part_out, part_lse in parts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.segments, ctx.scale, ctx.window = segments, scale, window
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for segment in ctx.segments:
            queries, blocks = _segment_blocks(segment, ctx.window)
            for keys, causal, band in blocks:
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_out[queries].contiguous(), q[queries], k[keys], v[keys], out[queries], lse[queries], 0.0,
                    causal, attn_mask=_band_mask(segment, band, ctx.window, q.dtype), scale=ctx.scale)
                dq[queries] += gq
                dk[keys] += gk
                dv[keys] += gv
        return dq, dk, dv, None, None, None


def _segment_blocks(segment: QuerySegment, window: int | None):
    """A segment's query index and its (key index, causal, band) blocks: its own keys causally, the earlier keys
    that all its queries see fully, and with a window the band that only some see."""
    rows = slice(None) if segment.row is None else slice(segment.row, segment.row + 1)
    start, length, position = segment.start, segment.length, segment.position

    def index(lo: int, hi: int) -> tuple:
        return rows, slice(None), slice(lo, hi)

    blocks = [(index(position, position + length), True, None)]
    seen_by_all = segment.first_key if window is None else max(segment.first_key, position + length - window)
    if position > seen_by_all:
        blocks.append((index(seen_by_all, position), False, None))
    if window is not None:
        band = _Band(max(segment.first_key, position - window + 1), seen_by_all)
        if band.hi > band.lo:
            blocks.append((index(*band), False, band))
    return index(start, start + length), blocks


def _band_mask(segment: QuerySegment, band: _Band | None, window: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive (length × band) mask: the query at position p sees key k iff k > p − window."""
    if band is None:
        return None
    keys = torch.arange(band.lo, band.hi)
    queries = torch.arange(segment.position, segment.position + segment.length)
    hidden = keys[None] <= queries[:, None] - window
    return torch.zeros(hidden.shape, dtype=dtype).masked_fill(hidden, float("-inf"))


def _unseen(segment: QuerySegment, band: _Band, window: int) -> torch.Tensor:
    """The queries of a segment that see none of its band's keys."""
    return torch.arange(segment.position, segment.position + segment.length) - window + 1 >= band.hi
