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

    @torch.compiler.disable  # Python loop over data-dependent lengths: a graph break, not a recompile per batch
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention per document: q (batch, heads, seq, d), k/v (batch, kv_heads, seq, d)."""
        rows = []
        for lengths, qr, kr, vr in zip(self.lengths, q.split(1), k.split(1), v.split(1)):
            pieces = zip(qr.split(lengths, 2), kr.split(lengths, 2), vr.split(lengths, 2))
            rows.append(torch.cat([self._causal(*piece) for piece in pieces], 2))
        return torch.cat(rows)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length, window = q.shape[2], self.sliding_window
        mask = None
        if window is not None and length > window:
            index = torch.arange(length, device=q.device)
            mask = (index[None] <= index[:, None]) & (index[None] > index[:, None] - window)
        return scaled_dot_product_attention(q, k, v, mask)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None) -> torch.Tensor:
    """Causal SDPA (``mask`` None) or SDPA with a boolean mask of allowed keys, with grouped key/value heads.

    Flash kernels (causal on every device, masked on CPU) read each key/value head for its query group; CUDA's
    memory-efficient kernel, which takes the masks there, has no GQA mode, so only that path repeats heads."""
    n_rep = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    if q.device.type == "cpu" or n_rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, d) → (batch, kv_heads·n_rep, seq, d), for SDPA kernels without a GQA mode."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
