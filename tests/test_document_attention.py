"""Attention inside packed documents (``document_ids``) equals the dense per-document mask it replaces."""
from __future__ import annotations

import pytest
import torch

from collie.data.pretrain import document_causal_mask, document_ids
from collie.models import ModelArgs, build_model
from collie.models.attention_kernels import DocumentSegments

# 1e-5 is the bar; the two paths sum the same masked softmax in different blockings, which moves fp32
# logits of this size (|logit| < 1) by ~1e-7 on any CPU.
ATOL = 1e-5


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    """Positions restarting at 0 at each document of the given lengths, one row per list."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


GEMMA2 = dict(architecture="gemma2", sandwich_norms=True, scale_embeddings=True, hidden_act="gelu_pytorch_tanh",
              attn_logit_softcapping=0.3, final_logit_softcapping=0.5, query_pre_attn_scalar=10)


def model_and_batch(sliding_window=None, rows=((5, 9, 1, 17), (32,), (3, 3, 20, 6)), **family):
    family = family or {"architecture": "llama" if sliding_window is None else "mistral"}
    args = ModelArgs(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=sliding_window, **family)
    model = build_model(args, device="cpu", seed=0)
    positions = packed_positions([list(r) for r in rows])
    tokens = torch.randint(0, 97, positions.shape, generator=torch.Generator().manual_seed(1))
    return model, tokens, positions


def forward_and_grads(model, tokens, **inputs):
    model.zero_grad()
    logits = model(tokens, **inputs)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def count_reads(monkeypatch) -> list:
    """Records each construction of DocumentSegments (each one reads the ids with a host sync)."""
    reads, init = [], DocumentSegments.__init__

    def counted(self, *args, **kwargs):
        reads.append(args)
        init(self, *args, **kwargs)
    monkeypatch.setattr(DocumentSegments, "__init__", counted)
    return reads


@pytest.mark.parametrize("window, family", [(None, {}), (4, {}), (4, GEMMA2)], ids=["causal", "window", "gemma2"])
def test_document_ids_equal_the_dense_mask_forward_and_backward(window, family, monkeypatch):
    """Also with Gemma 2's soft-capped attention kernel, alternating sliding and full layers, whose two windows
    share one read of the documents per forward."""
    model, tokens, positions = model_and_batch(window, **family)
    reads = count_reads(monkeypatch)
    fast = forward_and_grads(model, tokens, position_ids=positions, document_ids=document_ids(positions))
    assert len(reads) == 1
    dense = forward_and_grads(model, tokens, position_ids=positions, attention_mask=document_causal_mask(positions))
    torch.testing.assert_close(fast[0], dense[0], rtol=0, atol=ATOL)
    for name, grad in dense[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=0, atol=ATOL, msg=name)


def test_documents_do_not_see_each_other():
    model, tokens, positions = model_and_batch(rows=((6, 10),))
    alone = model(tokens[:, 6:], position_ids=positions[:, 6:])
    changed = tokens.clone()
    changed[:, :6] = (changed[:, :6] + 1) % 97  # a different first document
    packed = model(changed, position_ids=positions, document_ids=document_ids(positions))
    torch.testing.assert_close(packed[:, 6:], alone, rtol=0, atol=ATOL)


def test_right_padding_keeps_the_tokens_outputs():
    model, tokens, positions = model_and_batch(rows=((4, 12),))
    padding = torch.ones_like(tokens)
    padding[:, 13:] = 0
    ids = document_ids(positions)
    padded = model(tokens, position_ids=positions, attention_mask=padding, document_ids=ids)
    plain = model(tokens, position_ids=positions, document_ids=ids)
    torch.testing.assert_close(padded[:, :13], plain[:, :13], rtol=0, atol=0)


def test_segments_are_read_per_row():
    segments = DocumentSegments(torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]))
    assert segments.lengths == [[2, 3, 1], [6]]


def test_document_ids_refuse_a_cache_and_inner_padding():
    from collie.models.components import KVCache
    model, tokens, positions = model_and_batch(rows=((4, 4),))
    ids = document_ids(positions)
    with pytest.raises(ValueError, match="decoding with a cache"):
        model(tokens, position_ids=positions, document_ids=ids, cache=KVCache())
    left = torch.ones_like(tokens)
    left[:, 0] = 0
    with pytest.raises(ValueError, match="only mark right padding"):
        model(tokens, position_ids=positions, attention_mask=left, document_ids=ids)
