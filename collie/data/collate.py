"""Batching of tokenized samples with dynamic right padding."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens and padding)


def pad_collate(batch: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad samples ``{"input_ids", "labels"[, "position_ids"]}`` on the right to the longest one.

    The length is rounded up to ``pad_to_multiple_of`` when given. Returns ``input_ids``, ``labels``
    (IGNORE_INDEX on padding, so pad tokens never enter the loss), ``attention_mask`` (1 token, 0 padding),
    ``position_ids`` and ``num_tokens`` (int: labels that count in the loss). Positions come from the sample
    when present (packed samples restart them per document), else ``arange``; padding positions hold their
    column index, so an unpacked batch gets exactly ``arange`` rows, as a model would assume by default.
    """
    length = max(len(sample["input_ids"]) for sample in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    size = (len(batch), length)
    input_ids = torch.full(size, pad_token_id, dtype=torch.long)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(size, dtype=torch.long)
    position_ids = torch.arange(length).repeat(len(batch), 1)
    for row, sample in enumerate(batch):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"])
        labels[row, :n] = torch.as_tensor(sample["labels"])
        attention_mask[row, :n] = 1
        if "position_ids" in sample:
            position_ids[row, :n] = torch.as_tensor(sample["position_ids"])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids, "num_tokens": int((labels != IGNORE_INDEX).sum())}
