"""Tolerances derived from the dtype and the reductions, for comparing two computations of the same values that
sum in different orders: another CPU's kernels (AVX2, AVX-512, ARM), another thread count, a KV cache instead of
a full recomputation, another parallel layout, collie's kernels against transformers'.

Rounding a sum of n terms with unit roundoff u = eps/2 errs by at most about n·u·Σ|terms| (Higham, *Accuracy and
Stability of Numerical Algorithms*, §4.2), so two orders of the same sum differ by at most 2·n·u of the magnitude
involved. A network chains ``depth`` such reductions (each matmul, the attention scores and their weighted sum),
and the errors add up to first order: the bound is 2·depth·n·u relative to the size of the values compared. It is
a worst case (the typical error grows like sqrt(n)·u), so it holds on any CPU, and it is still far below what a
real bug moves (a wrong mask, position or weight changes logits by O(1)).
"""
from __future__ import annotations

import torch


def relative_bound(dtype: torch.dtype, reduction: int, depth: int = 1) -> float:
    """The worst-case relative difference of two summation orders: 2·depth·reduction·u."""
    return 2 * depth * reduction * torch.finfo(dtype).eps / 2


def decoder_depth(num_layers: int) -> int:
    """Chained reductions of a decoder's forward: q/k/v, scores, weighted values, o_proj, up/gate, down per layer,
    plus the LM head."""
    return 6 * num_layers + 1


def assert_close_fp(actual: torch.Tensor, expected: torch.Tensor, reduction: int, depth: int = 1, msg=None) -> None:
    """``assert_close`` within ``relative_bound`` of the largest magnitude in ``expected`` (absolute, so that
    values near zero, which carry the rounding of their larger inputs, are judged on the same scale)."""
    bound = relative_bound(expected.dtype, reduction, depth)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound * max(scale, 1.0), msg=msg)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, config, seq_len: int | None = None,
                        msg=None) -> None:
    """Logits of the same decoder computed two ways: the longest reduction is the hidden size, the MLP width or
    the attended sequence; the depth is the decoder's (``decoder_depth``). ``config``: ModelArgs, a transformers
    config or a dict with hidden_size, intermediate_size and num_hidden_layers."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    reduction = max(get("hidden_size"), get("intermediate_size"), seq_len or expected.shape[-2])
    assert_close_fp(actual, expected, reduction, decoder_depth(get("num_hidden_layers")), msg)
