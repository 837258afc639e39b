"""Context parallelism: the sequence of every micro-batch is split over the ``cp`` ranks of a data-parallel
replica, and each attention layer all-gathers keys and values over them.

Load balance: the (padded) sequence is cut into 2·cp equal chunks and cp rank r holds chunk r and chunk
2·cp−1−r, so every rank gets the same causal work (an early chunk sees few keys, its partner many). The engine
splits token ids, positions and next-token targets before the model runs (``ContextParallel.shard``); the model
itself is unchanged: ``apply`` replaces the ``kernel(q, k, v, mask)`` of every decoder layer's attention with one
that gathers k/v of the whole sequence (differentiable: funcol's all-gather, whose backward reduce-scatters the k/v
gradients to their owners) and attends this rank's queries to them by *global* positions. Causal SDPA on CPU, also
within packed documents (``data.document_masking``) and sliding windows, needs no (s/cp × s) mask: each chunk (cut
at document starts, and into pieces no longer than the window) attends its own block causally and the keys before
it (back to its document's start) fully, with a window only the band that some of its queries see under a small
mask, merged by log-sum-exp (``chunked_causal_attention``). Everything else (padding that is not at the right,
soft-capped scores, CUDA) runs the layer's own kernel under one (s/cp × s) mask per forward.

All-gather rather than ring attention: exact with any mask and any kernel, and k/v are small under GQA
(kv_heads/heads of the queries), so the gathered copy costs less than the queries a rank holds. Ring attention
would overlap the exchange with compute; torch's ``context_parallel`` only handles CUDA SDPA ops and cannot run on
CPU/gloo. Under tensor parallelism each tp rank gathers its own heads over its cp group; with sequence parallelism
the rank's share is padded to a multiple of tp. Outside a split (generation, full-logit evaluation) the kernel is
the model's own and every cp rank runs the whole sequence (the model is replicated over cp).
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single_autograd

from collie.data.pretrain import document_ids
from collie.loss import IGNORE_INDEX, shift_labels
from collie.models.attention_kernels import DocumentSegments, QuerySegment, chunked_causal_attention
from collie.models.components import is_right_padded


def shard_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions held by cp rank ``rank``: chunk ``rank`` and chunk ``2·cp−1−rank`` of 2·cp equal chunks
    (``seq_len`` must be a multiple of 2·cp)."""
    chunks = torch.arange(seq_len, device=device).view(2 * cp, seq_len // (2 * cp))
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


@dataclass
class SequenceShard:
    """This rank's share of a micro-batch and what its attention needs: ``input_ids``, ``position_ids`` and next-
    token ``targets`` of the local positions (b, s/cp); which (local query × gathered key) pairs may attend."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor  # global position of each gathered key (the ranks' shards, in rank order)
    padding: torch.Tensor | None  # (b, s) padding mask when it is not right padding
    documents: torch.Tensor | None  # (b, s) document ids with data.document_masking
    _masks: dict = field(default_factory=dict)
    _segments: dict = field(default_factory=dict)

    def query_segments(self, window: int | None = None) -> list[QuerySegment] | None:
        """This rank's queries as the segments of ``chunked_causal_attention`` (each attends, by global position,
        the keys of its document up to itself): the two chunks, cut at document starts when packed documents are
        masked and into pieces no longer than a sliding ``window``; None when the padding needs a mask (not right
        padding). Built once per forward and window."""
        if self.padding is not None:
            return None
        if window not in self._segments:
            chunk = len(self.query_positions) // 2
            starts = [int(self.query_positions[0]), int(self.query_positions[chunk])]
            if self.documents is None:
                segments = [QuerySegment(None, i * chunk, chunk, 0, start) for i, start in enumerate(starts)]
            else:  # document lengths of every row, read with one host sync
                segments = [segment for row, lengths in enumerate(DocumentSegments(self.documents).lengths)
                            for segment in _cut_at_documents(row, lengths, starts, chunk)]
            if window is not None:  # pieces no longer than the window
                segments = [QuerySegment(row, start + i, min(window, length - i), first, position + i)
                            for row, start, length, first, position in segments for i in range(0, length, window)]
            self._segments[window] = segments
        return self._segments[window]

    @cached_property
    def key_order(self) -> torch.Tensor:
        """The permutation that puts gathered keys in global order."""
        return self.key_positions.argsort()

    def mask(self, window: int | None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (b|1, 1, s/cp, s) mask of a layer with this attention window (None: full causal), built once per
        forward: boolean, or with ``dtype`` additive (0 / -inf). SDPA converts a boolean mask to an additive one in
        every call and saves the copy for backward, once per layer; an additive mask of the query dtype is saved
        by reference."""
        if (window, dtype) not in self._masks:
            queries, keys = self.query_positions[:, None], self.key_positions[None]
            allowed = (keys <= queries)[None]  # (1, q, k): causal by global position
            if window is not None:
                allowed = allowed & (keys > queries - window)
            if self.padding is not None:  # real tokens never see the right padding after them
                allowed = allowed & self.padding.bool()[:, None, self.key_positions]
            if self.documents is not None:
                docs = self.documents
                allowed = allowed & (docs[:, self.query_positions, None] == docs[:, None, self.key_positions])
            allowed = (allowed | (keys == queries)[None])[:, None]  # a query always sees itself
            if dtype is not None:
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                    ~allowed, float("-inf"))
            self._masks[window, dtype] = allowed
        return self._masks[window, dtype]


def _cut_at_documents(row: int, lengths: list[int], starts: list[int], chunk: int):
    """The query segments of one row's chunks (global ``starts``, ``chunk`` long) cut at the starts of its
    documents (of ``lengths``)."""
    doc_starts = list(itertools.accumulate(lengths[:-1], initial=0))
    for index, start in enumerate(starts):
        end = start + chunk
        cuts = [start, *(d for d in doc_starts if start < d < end), end]
        for a, b in zip(cuts, cuts[1:]):
            first_key = doc_starts[bisect.bisect_right(doc_starts, a) - 1]
            yield QuerySegment(row, index * chunk + a - start, b - a, first_key, a)


class ContextParallel:
    """The plan of one cp group: applied once to a model (``apply``), then each forward that should run split
    goes through ``shard`` and ``attending``."""

    def __init__(self, cp_mesh, sequence_multiple: int = 1):
        """``sequence_multiple``: what each rank's share must be a multiple of (tp under sequence parallelism,
        which splits it again over the tp ranks)."""
        self.mesh, self.cp, self.rank = cp_mesh, cp_mesh.size(), cp_mesh.get_local_rank()
        self.sequence_multiple = sequence_multiple
        self._shard: SequenceShard | None = None
        self._through_backward = False

    def apply(self, model: torch.nn.Module) -> None:
        """Wrap the attention kernel of every decoder layer (``layer.self_attn.kernel``)."""
        from collie.models.hf_backend import decoder_layers
        for layer in decoder_layers(model).values():
            attention = layer.self_attn
            sdpa = getattr(attention, "softcap", None) is None  # the soft-capping kernel is a kernel of its own
            attention.kernel = partial(self._attend, attention.kernel, getattr(layer, "sliding_window", None), sdpa,
                                       getattr(attention, "scale", None))

    def shard(self, batch: dict, document_masking: bool = False) -> SequenceShard:
        """Split a collated batch (``input_ids``, ``labels``, ``attention_mask``, ``position_ids``) for this rank.
        The sequence is right-padded to a multiple of 2·cp·``sequence_multiple`` (padding tokens have no loss and
        no real token sees them); the targets are shifted before the split, so no next-token pair is lost at a
        chunk boundary."""
        input_ids, padding = batch["input_ids"], batch["attention_mask"]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        targets = shift_labels(batch["labels"])
        extra = -input_ids.shape[1] % (2 * self.cp * self.sequence_multiple)
        if extra:
            input_ids, padding = F.pad(input_ids, (0, extra)), F.pad(padding, (0, extra))
            targets = F.pad(targets, (0, extra), value=IGNORE_INDEX)
            more = positions[:, -1:] + torch.arange(1, extra + 1, device=positions.device)
            positions = torch.cat([positions, more], 1)
        seq_len, device = input_ids.shape[1], input_ids.device
        mine = shard_positions(seq_len, self.cp, self.rank, device)
        keys = torch.cat([shard_positions(seq_len, self.cp, r, device) for r in range(self.cp)])
        return SequenceShard(input_ids[:, mine], positions[:, mine], targets[:, mine], mine, keys,
                             None if is_right_padded(padding) else padding,
                             document_ids(positions) if document_masking else None)

    @contextlib.contextmanager
    def attending(self, shard: SequenceShard):
        """Forwards inside run split: attention gathers k/v over cp and uses ``shard``'s masks. Inside
        ``through_backward`` the shard stays for the backward that follows."""
        self._shard = shard
        try:
            yield
        finally:
            if not self._through_backward:
                self._shard = None

    @contextlib.contextmanager
    def through_backward(self):
        """Keep the shard of the split forwards inside for their backward: activation checkpointing recomputes the
        attention there, which must gather and mask as the forward did."""
        self._through_backward = True
        try:
            yield
        finally:
            self._through_backward, self._shard = False, None

    def _attend(self, kernel, window, sdpa: bool, scale, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask) -> torch.Tensor:
        """``kernel`` over k/v of the whole sequence; ``mask`` (built by the model from local indices) is
        replaced by the shard's mask by global positions. Unsplit forwards call ``kernel`` as it is. SDPA layers on
        CPU (documents and windows too) need no such mask: ``chunked_causal_attention`` over the keys in global
        order."""
        if self._shard is None:
            return kernel(q, k, v, mask)
        shard = self._shard
        k = all_gather_single_autograd(k.contiguous(), 2, self.mesh)
        v = all_gather_single_autograd(v.contiguous(), 2, self.mesh)
        window = None if window is None or window >= k.shape[2] else window
        if sdpa and q.device.type == "cpu" and shard.query_segments(window) is not None:
            order = shard.key_order
            return chunked_causal_attention(q, k.index_select(2, order), v.index_select(2, order),
                                            shard.query_segments(window), scale, window)
        return kernel(q, k, v, shard.mask(window, q.dtype if sdpa else None))
