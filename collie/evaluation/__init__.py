"""Evaluators (perplexity, text metrics of generated responses, log-likelihood multiple choice), metrics and
text generation with a KV cache. docs/evaluation.md describes them."""
from collie.evaluation.choice import ChoiceRecord, choice_eval, load_choice_records, parse_choice_record
from collie.evaluation.generation import cut_at_stop, generate, generate_text
from collie.evaluation.metrics import TEXT_METRICS, accuracy, f1_macro, register_text_metric

__all__ = ["ChoiceRecord", "TEXT_METRICS", "accuracy", "choice_eval", "cut_at_stop", "f1_macro", "generate",
           "generate_text", "load_choice_records", "parse_choice_record", "register_text_metric"]
