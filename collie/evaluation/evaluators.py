"""Evaluators: perplexity weighted by tokens, text metrics of generated responses (exact match, BLEU, ROUGE)
and log-likelihood multiple choice / classification (``collie.evaluation.choice``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from collie.evaluation.choice import CHOICE_METRICS, choice_eval, load_choice_records
from collie.evaluation.generation import cut_at_stop, generate
from collie.evaluation.metrics import TEXT_METRICS, get_text_metric
from collie.loss import IGNORE_INDEX, count_loss_tokens

__all__ = ["CHOICE_METRICS", "TEXT_METRICS", "choice_eval", "generation_metrics",
           "load_choice_records", "perplexity", "split_prompt_response"]


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


def split_prompt_response(input_ids: list[int], labels: list[int], eos_id: int | Sequence[int] | None):
    """The prompt (tokens before the first response token) and the reference response (EOS, or every id of
    ``eos_id`` when it is several, dropped)."""
    ends = {eos_id} if eos_id is None or isinstance(eos_id, int) else set(eos_id)
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    response = [t for t, label in zip(input_ids[start:], labels[start:]) if label != IGNORE_INDEX]
    return input_ids[:start], [t for t in response if t not in ends]


@torch.no_grad()
def generation_metrics(model, dataset, tokenizer, batch_size: int, max_new_tokens: int, limit: int | None = None,
                       device=None, metrics: Sequence[str] = ("exact_match",), stop: Sequence[str] = (),
                       pad_to_multiple_of: int = 1, eos_ids: Sequence[int] | None = None) -> dict:
    """Greedy responses to the prompts of instruction samples, scored against their reference responses by the
    named ``TEXT_METRICS`` (one generation pass for all of them), plus ``samples``. ``pad_to_multiple_of``: see
    ``generate``. ``eos_ids``: where a response ends (default the tokenizer's EOS; a chat template's end-of-turn
    tokens too, ``collie.data.templates.stop_token_ids``)."""
    eos = list(eos_ids) if eos_ids else tokenizer.eos_token_id
    scorers = [get_text_metric(name) for name in metrics]
    count = len(dataset) if limit is None else min(limit, len(dataset))
    pairs = [split_prompt_response(s["input_ids"].tolist(), s["labels"].tolist(), eos)
             for s in (dataset[i] for i in range(count))]
    predictions = []
    for start in range(0, len(pairs), batch_size):
        prompts = [prompt for prompt, _ in pairs[start:start + batch_size]]
        outputs = generate(model, prompts, max_new_tokens, eos, tokenizer.pad_token_id,
                           device=device, stop=stop, decode=tokenizer.decode, pad_to_multiple_of=pad_to_multiple_of)
        predictions += [cut_at_stop(tokenizer.decode(out), stop).strip() for out in outputs]
    references = [tokenizer.decode(reference).strip() for _, reference in pairs]
    results = {}
    for scorer in scorers:
        results.update(scorer(predictions, references))
    return {**results, "samples": len(pairs)}
