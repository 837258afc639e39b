"""Metrics that compare predictions with references.

``accuracy`` and ``f1_macro`` compare labels; the text metrics (exact match, BLEU through ``sacrebleu``, ROUGE
through ``rouge_score``) compare generated texts with reference texts and are looked up by name in
``TEXT_METRICS``; ``@register_text_metric("name")`` adds one, which ``eval.metrics`` can then name.
"""
from __future__ import annotations

from typing import Callable, Sequence

from collie.errors import ConfigError

TextMetric = Callable[[Sequence[str], Sequence[str]], dict]
TEXT_METRICS: dict[str, TextMetric] = {}


def register_text_metric(name: str):
    """Register ``fn(predictions, references) -> {result key: value}`` under ``name``."""
    def register(fn: TextMetric) -> TextMetric:
        TEXT_METRICS[name] = fn
        return fn
    return register


def get_text_metric(name: str) -> TextMetric:
    if name not in TEXT_METRICS:
        raise ConfigError(f"text metric {name!r} is unknown; choose from {sorted(TEXT_METRICS)}")
    return TEXT_METRICS[name]


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference (0.0 for no samples)."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def f1_macro(predictions: Sequence, references: Sequence) -> float:
    """Unweighted mean of the per-label F1 over every label seen in references or predictions (as sklearn's
    ``f1_score(average="macro")``); a label never predicted nor present scores 0."""
    _check_lengths(predictions, references)
    labels = sorted(set(references) | set(predictions), key=repr)
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        true_pos = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted, actual = sum(p == label for p in predictions), sum(r == label for r in references)
        scores.append(2 * true_pos / (predicted + actual) if predicted + actual else 0.0)
    return sum(scores) / len(scores)


@register_text_metric("exact_match")
def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Fraction of predictions equal to the reference once surrounding whitespace is stripped."""
    return {"exact_match": accuracy([p.strip() for p in predictions], [r.strip() for r in references])}


@register_text_metric("bleu")
def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU (0–100) of ``sacrebleu`` with its default 13a tokenizer, one reference per prediction."""
    import sacrebleu
    _check_lengths(predictions, references)
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


@register_text_metric("rouge")
def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure (0–1) of ``rouge_score`` with stemming. Its tokenizer keeps only ASCII
    letters and digits, so texts in other scripts score 0."""
    from rouge_score import rouge_scorer
    _check_lengths(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: total / max(len(references), 1) for kind, total in totals.items()}
