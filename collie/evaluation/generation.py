"""Batched text generation with left padding: greedy or temperature/top-p sampling, stop at EOS."""
from __future__ import annotations

import torch


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the matching 1/0 attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token per row: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix with mass >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, pad_id: int,
             temperature: float = 0.0, top_p: float = 1.0, generator=None, device=None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens, EOS excluded.

    ``model`` is any callable ``(ids, position_ids=, attention_mask=) -> logits``; ``device`` defaults to the
    device of its parameters."""
    device = device or next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, position_ids=positions, attention_mask=mask)[:, -1]
        token = sample_next(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)  # finished rows only pad
        new_tokens.append(token)
        if eos_id is not None:
            done |= token == eos_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.all():
            break
    out = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [_until_eos(row, eos_id) for row in out]


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    return tokens[:tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens
