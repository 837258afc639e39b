"""Instruction-tuning data: conversations → ``input_ids`` with labels on the assistant turns only.

Records (JSONL lines, or the elements of a JSON list) come in three formats, detected per record:

* Alpaca: ``{"instruction", "input"?, "output", "system"?}``
* messages: ``{"messages": [{"role": "system" | "user" | "assistant", "content"}]}``
* ShareGPT: ``{"conversations": [{"from": "system" | "human" | "gpt", "value"}]}``

A template renders a conversation as segments ``(text, is_response)``; each segment is tokenized on its own,
so the label mask is exactly the assistant spans (plus the EOS that ends each of them). ``data.template`` names a
registered template (alpaca, chatml), ``tokenizer`` for the tokenizer's own chat template, or gives a Jinja chat
template in the Hugging Face format: a ``.jinja`` file or the template text itself.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Dataset

from collie.data.collate import IGNORE_INDEX
from collie.errors import ConfigError, DataError
from collie.schema import suggest

logger = logging.getLogger("collie")

TEMPLATES = {}
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
ROLE_CHOICES = {"role": "system, user, assistant", "from": "system, human, gpt"}
JINJA_SUFFIXES = (".jinja", ".jinja2", ".j2")


def register_template(name: str):
    """Register ``fn(messages, tokenizer) -> [(text, is_response), ...]`` as ``data.template: name``."""
    def register(fn):
        TEMPLATES[name] = fn
        return fn
    return register


@register_template("alpaca")
def alpaca_template(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Alpaca: a preamble (the system message, else Alpaca's), then ``### Instruction:`` / ``### Response:``."""
    segments, prompt = [], "" if messages[0]["role"] == "system" else ALPACA_PREAMBLE + "\n\n"
    for message in messages:
        if message["role"] == "assistant":
            segments += [(prompt + "### Response:\n", False), (message["content"], True)]
            prompt = "\n\n"
        elif message["role"] == "user":
            prompt += f"### Instruction:\n{message['content']}\n\n"
        else:
            prompt += f"{message['content']}\n\n"
    return segments


@register_template("chatml")
def chatml_template(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """ChatML markers as plain text; an assistant turn ends with the tokenizer's EOS (where generation stops)."""
    segments, prompt = [], ""
    for message in messages:
        if message["role"] == "assistant":
            segments += [(prompt + "<|im_start|>assistant\n", False), (message["content"], True)]
            prompt = "\n"
        else:
            prompt += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
    return segments


@register_template("tokenizer")
def tokenizer_template(messages: list[dict], tokenizer, chat_template: str | None = None) -> list[tuple[str, bool]]:
    """The tokenizer's chat template (or ``chat_template``); an assistant span is the text its turn adds."""
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, chat_template=chat_template)
        full = tokenizer.apply_chat_template(messages[:i + 1], chat_template=chat_template)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            owner = "data.template" if chat_template else f"tokenizer '{_name(tokenizer)}'"
            raise DataError(f"the chat template of {owner} does not render a conversation as a prefix of its "
                            f"continuation, so assistant spans cannot be found; set data.template: alpaca")
        segments += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    return segments


@dataclass
class InstructionStats:
    """What loading did to the records; truncations and skips are reported, never hidden."""
    records: int = 0
    truncated: int = 0
    dropped_responses: int = 0
    skipped: int = 0
    sequences: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def __str__(self) -> str:
        return (f"{self.records} records -> {self.sequences} sequences of {self.tokens} tokens "
                f"({self.label_tokens} in the loss); {self.truncated} truncated (losing "
                f"{self.dropped_responses} whole later assistant turns), {self.skipped} skipped because no "
                f"response token fits")


class InstructionDataset(Dataset):
    """Samples ``{"input_ids", "labels"}`` (+ ``"position_ids"`` when packed) as LongTensors."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def load_instruction_dataset(files, tokenizer, seq_len: int, template: str = "alpaca", pack: bool = False,
                             min_prompt_tokens: int = 16) -> tuple[InstructionDataset, InstructionStats]:
    """Tokenize every record of ``files`` (.jsonl / .json list) into samples of at most ``seq_len`` tokens.

    Too-long conversations lose prompt tokens from the left first (keeping at least ``min_prompt_tokens`` of
    the prompt's end), then response tokens from the right; a record of which no response token would fit
    is skipped. Cutting from the right may remove whole later turns of a multi-turn conversation; they are
    counted in ``dropped_responses``. ``pack=True`` concatenates conversations greedily into sequences of at most
    ``seq_len`` tokens whose ``position_ids`` restart at 0 at every conversation.
    """
    files = [files] if isinstance(files, (str, Path)) else list(files)
    render = resolve_template(template, tokenizer)
    stats, samples = InstructionStats(), []
    for where, record in (item for path in files for item in read_records(path)):
        stats.records += 1
        ids, labels = encode_conversation(render(record_to_messages(record, where), tokenizer), tokenizer)
        responses = count_spans(labels)
        ids, labels, status = truncate(ids, labels, seq_len, tokenizer.bos_token_id, min_prompt_tokens)
        if status == "skipped":
            stats.skipped += 1
            continue
        stats.truncated += status == "truncated"
        stats.dropped_responses += responses - count_spans(labels)
        samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    if not samples:
        raise DataError(f"no usable instruction records in {', '.join(map(str, files))} ({stats})")
    if pack:
        samples = pack_samples(samples, seq_len)
    stats.sequences, stats.tokens = len(samples), sum(len(s["input_ids"]) for s in samples)
    stats.label_tokens = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in samples)
    if stats.truncated or stats.skipped:
        logger.warning("instruction data: %d of %d records truncated (%d whole assistant turns dropped), %d "
                       "skipped (data.seq_len=%d)", stats.truncated, stats.records, stats.dropped_responses,
                       stats.skipped, seq_len)
    return InstructionDataset(samples), stats


def resolve_template(name: str, tokenizer):
    """The render function for ``data.template``: a registered name, or a Jinja chat template (file or text)."""
    if name.endswith(JINJA_SUFFIXES) or "{{" in name or "{%" in name:
        return partial(tokenizer_template, chat_template=read_chat_template(name))
    if name not in TEMPLATES:
        raise ConfigError(f"data.template={name!r} is not a template{suggest(name, TEMPLATES)}; "
                          f"choose one of {', '.join(sorted(TEMPLATES))}, or a Jinja chat template (.jinja file)")
    if name == "tokenizer" and not tokenizer.chat_template:
        raise ConfigError(f"data.template=tokenizer but tokenizer '{_name(tokenizer)}' has no chat template; "
                          f"set data.template: alpaca")
    return TEMPLATES[name]


def read_chat_template(template: str) -> str:
    if "{{" in template or "{%" in template:
        return template
    path = Path(template)
    if not path.is_file():
        raise ConfigError(f"data.template: chat template file '{path}' does not exist")
    return path.read_text(encoding="utf-8")


def count_spans(labels: list[int]) -> int:
    """Runs of consecutive labelled tokens: one per assistant turn."""
    previous, runs = IGNORE_INDEX, 0
    for label in labels:
        runs += label != IGNORE_INDEX and previous == IGNORE_INDEX
        previous = label
    return runs


def read_records(path):
    """Yield ``(where, record)``; ``where`` names the file and the 1-based line (JSONL) or element (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}, line {number}", _parse_json(line, f"{path}, line {number}")
    elif path.suffix == ".json":
        records = _parse_json(path.read_text(encoding="utf-8"), str(path))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        yield from ((f"{path}, record {number}", r) for number, r in enumerate(records, 1))
    else:
        raise DataError(f"data file '{path}': expected a .jsonl or .json file")


def record_to_messages(record, where: str) -> list[dict]:
    """The record as ``[{"role", "content"}]`` with roles system/user/assistant."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], f"{where}: messages", "role", "content")
    elif "conversations" in record:
        messages = _messages(record["conversations"], f"{where}: conversations", "from", "value")
    else:
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise DataError(f"{where}: missing text field '{field}' (Alpaca records need 'instruction' and "
                                f"'output'; conversations need 'messages' or 'conversations')")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages = system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (role 'assistant' / from 'gpt') to learn from")
    return messages


def _messages(turns, where: str, role_key: str, text_key: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in ROLES:
            raise DataError(f"{where}[{i}]: missing or invalid field '{role_key}'; expected one of "
                            f"{ROLE_CHOICES[role_key]}")
        if not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}[{i}]: missing text field '{text_key}'")
        messages.append({"role": ROLES[turn[role_key]], "content": turn[text_key]})
    return messages


def encode_conversation(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels: BOS first, EOS after each response unless the template already ends it so;
    labels are IGNORE_INDEX except on response tokens."""
    eos, ids, labels = tokenizer.eos_token_id, [], []
    for text, is_response in segments:
        tokens = tokenizer.encode(text)
        if is_response and eos is not None and eos not in tokens:
            tokens.append(eos)
        ids += tokens
        labels += tokens if is_response else [IGNORE_INDEX] * len(tokens)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:  # chat templates often render the BOS themselves
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def truncate(ids: list[int], labels: list[int], seq_len: int, bos: int | None, min_prompt_tokens: int):
    """``(ids, labels, status)`` cut to ``seq_len``; status is "kept", "truncated" or "skipped".

    The prompt (tokens before the first response) loses tokens from its left end, down to
    ``min_prompt_tokens``; then the rest loses tokens from its right end. BOS stays.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        return ids, labels, "skipped"
    if len(ids) <= seq_len:
        return ids, labels, "kept"
    head = int(bos is not None and ids[0] == bos)
    budget, prompt_len = seq_len - head, first - head
    keep_prompt = min(prompt_len, max(budget - (len(ids) - first), min_prompt_tokens))
    keep_rest = budget - keep_prompt
    if keep_rest <= 0:
        return ids, labels, "skipped"
    kept = list(range(head)) + list(range(first - keep_prompt, first + keep_rest))
    return [ids[i] for i in kept], [labels[i] for i in kept], "truncated"


def pack_samples(samples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate consecutive samples greedily into sequences of at most ``seq_len`` tokens."""
    packs, current, length = [], [], 0
    for sample in samples:
        if current and length + len(sample["input_ids"]) > seq_len:
            packs.append(_concatenate(current))
            current, length = [], 0
        current.append(sample)
        length += len(sample["input_ids"])
    return packs + [_concatenate(current)]


def _concatenate(samples: list[dict]) -> dict:
    return {"input_ids": torch.cat([s["input_ids"] for s in samples]),
            "labels": torch.cat([s["labels"] for s in samples]),
            "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])}


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name", type(tokenizer).__name__)


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
