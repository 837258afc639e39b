"""Evaluators: perplexity weighted by tokens, and exact match of generated responses."""
from __future__ import annotations

import math

import torch

from collie.evaluation.generation import generate
from collie.trainer.loss import IGNORE_INDEX, count_loss_tokens


@torch.no_grad()
def perplexity(batches, loss_sum_fn, all_reduce=None) -> dict:
    """Token-weighted loss over all batches (not a mean of batch means) and its exponential.

    ``loss_sum_fn(batch)`` returns the summed token loss of a batch; ``all_reduce`` sums a tensor over the
    ranks that evaluated different batches (data parallelism), so every rank gets the global figures.
    """
    totals = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        totals += torch.stack([loss_sum_fn(batch).double().cpu(), count_loss_tokens(batch["labels"]).double().cpu()])
    if all_reduce is not None:
        totals = all_reduce(totals)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1])}


def split_prompt_response(input_ids: list[int], labels: list[int], eos_id: int | None):
    """The prompt (tokens before the first response token) and the reference response (EOS dropped)."""
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    response = [t for t, label in zip(input_ids[start:], labels[start:]) if label != IGNORE_INDEX]
    return input_ids[:start], [t for t in response if t != eos_id]


@torch.no_grad()
def exact_match(model, dataset, tokenizer, batch_size: int, max_new_tokens: int, limit: int | None = None,
                device=None) -> dict:
    """Fraction of samples whose greedy continuation equals the reference response (compared as text)."""
    pairs = [split_prompt_response(s["input_ids"].tolist(), s["labels"].tolist(), tokenizer.eos_token_id)
             for s in (dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset))))]
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        outputs = generate(model, [p for p, _ in chunk], max_new_tokens, tokenizer.eos_token_id,
                           tokenizer.pad_token_id, device=device)
        correct += sum(tokenizer.decode(out).strip() == tokenizer.decode(ref).strip()
                       for out, (_, ref) in zip(outputs, chunk))
    return {"exact_match": correct / max(len(pairs), 1), "samples": len(pairs)}
