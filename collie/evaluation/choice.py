"""Multiple choice and classification by the log-likelihood of each option given the prompt.

A record is ``{"prompt" or "question": str, "choices" or "options": [str, ...], "answer": index or option text}``.
Each option is scored by the summed log-probability of its tokens after the prompt (``accuracy``) and by that sum
divided by its token count (``accuracy_norm``, which does not favour short options). Options are tokenized
together with the prompt, so write the separating space into the option (``" Paris"``) or the prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from collie.distributed import full_logits
from collie.errors import DataError
from collie.evaluation.metrics import accuracy, f1_macro

PROMPT_KEYS, CHOICE_KEYS = ("prompt", "question"), ("choices", "options")
CHOICE_METRICS = ("multiple_choice", "classification")  # eval.metrics names; classification adds macro F1


@dataclass
class ChoiceRecord:
    prompt: str
    choices: list[str]
    answer: int  # index into choices


def parse_choice_record(record, index: int, source: str = "records") -> ChoiceRecord:
    """A ``ChoiceRecord`` from a dict, or a DataError naming ``source``, the record index and the field."""
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not an object with prompt, choices and answer")
    prompt = _first_field(record, PROMPT_KEYS, where)
    choices = _first_field(record, CHOICE_KEYS, where)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: the prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: choices must be a list of at least two non-empty strings, got {choices!r}")
    if "answer" not in record:
        raise DataError(f"{where} has no 'answer' (the index of the correct choice, or its text)")
    return ChoiceRecord(prompt, choices, _answer_index(record["answer"], choices, where))


def _first_field(record: dict, keys: tuple[str, ...], where: str):
    for key in keys:
        if key in record:
            return record[key]
    raise DataError(f"{where} has none of the fields {' / '.join(map(repr, keys))}; "
                    f"it has {sorted(record)}")


def _answer_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
        raise DataError(f"{where}: answer={answer} is out of range; use 0..{len(choices) - 1} or a choice's text")
    if isinstance(answer, str) and answer in choices:
        return choices.index(answer)
    raise DataError(f"{where}: answer={answer!r} is neither an index 0..{len(choices) - 1} nor one of {choices}")


def load_choice_records(path) -> list[ChoiceRecord]:
    """Records from a JSONL file (one object per line) or a JSON file holding a list of objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (multiple-choice records, JSONL or a JSON list)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json file must hold a list of records; use JSONL for one per line")
            return [parse_choice_record(r, i, str(path)) for i, r in enumerate(data)]
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return [parse_choice_record(_json_line(line, path, n), i, str(path)) for i, (n, line) in enumerate(lines)]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def _json_line(line: str, path: Path, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None


def option_token_ids(tokenizer, prompt: str, option: str) -> tuple[list[int], int]:
    """The tokens of prompt + option (with BOS) and how many of them belong to the prompt. Tokenized as one
    text, the option starts where the encoding stops agreeing with the prompt's own."""
    context = tokenizer.encode(prompt, add_bos=True)
    whole = tokenizer.encode(prompt + option, add_bos=True)
    shared = next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b), min(len(context), len(whole)))
    return whole, max(min(shared, len(whole) - 1), 1)


@torch.no_grad()
def option_loglikelihoods(model, sequences: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                          device=None, pad_to_multiple_of: int = 1) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each sequence's tokens after its first ``n`` (the prompt);
    batches are right-padded to a multiple of ``pad_to_multiple_of`` (tp under sequence parallelism)."""
    device = device or next(iter(model.parameters())).device
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        width += -width % pad_to_multiple_of
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        scored = torch.zeros((len(chunk), width - 1), dtype=torch.bool)  # position t predicts token t + 1
        for i, (tokens, n_prompt) in enumerate(chunk):
            ids[i, :len(tokens)] = torch.tensor(tokens)
            scored[i, n_prompt - 1:len(tokens) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        lengths = torch.tensor([len(tokens) for tokens, _ in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()  # right padding
        logits = full_logits(model(ids, attention_mask=mask))[:, :-1].float()
        token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums = token_logp.masked_fill(~scored, 0.0).sum(-1)
        out += list(zip(sums.tolist(), scored.sum(-1).tolist()))
    return out


def choice_eval(model, records: list[ChoiceRecord], tokenizer, batch_size: int, limit: int | None = None,
                device=None, f1: bool = False, pad_to_multiple_of: int = 1) -> dict:
    """Accuracy of the highest-scoring option (summed and length-normalised log-likelihood); with ``f1`` the
    macro F1 over answer texts too (classification: the choices are the class labels)."""
    records = records[:limit] if limit is not None else records
    pairs = [option_token_ids(tokenizer, r.prompt, c) for r in records for c in r.choices]
    scores = iter(option_loglikelihoods(model, pairs, batch_size, tokenizer.pad_token_id, device,
                                        pad_to_multiple_of))
    predicted, predicted_norm = [], []
    for record in records:
        options = [next(scores) for _ in record.choices]
        predicted.append(max(range(len(options)), key=lambda i: options[i][0]))
        predicted_norm.append(max(range(len(options)), key=lambda i: options[i][0] / options[i][1]))
    answers = [r.answer for r in records]
    results = {"choice_accuracy": accuracy(predicted, answers),
               "choice_accuracy_norm": accuracy(predicted_norm, answers), "choice_samples": len(records)}
    if f1:
        labels = [r.choices[p] for r, p in zip(records, predicted)]
        results["choice_f1_macro"] = f1_macro(labels, [r.choices[r.answer] for r in records])
    return results
