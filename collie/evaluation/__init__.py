"""Evaluators (perplexity, exact match) and text generation."""
from collie.evaluation.generation import generate

__all__ = ["generate"]
