"""Instruction-tuning data: conversations → ``input_ids`` with labels on the assistant turns only.

Records (JSONL lines, or the elements of a JSON list) come in three formats, detected per record:

* Alpaca: ``{"instruction", "input"?, "output", "system"?}``
* messages: ``{"messages": [{"role": "system" | "user" | "assistant", "content"}]}``
* ShareGPT: ``{"conversations": [{"from": "system" | "human" | "gpt", "value"}]}``

A template (``collie.data.templates``) renders a conversation as segments ``(text, is_response)``; each segment
is tokenized on its own, so the label mask is exactly the assistant spans (plus the EOS that ends each of them,
unless the template's own end-of-turn marker does). ``data.template`` names a registered template (alpaca,
chatml, llama2, llama3, mistral, qwen2, internlm2), ``tokenizer`` for the tokenizer's own chat template, or gives
a Jinja chat template in the Hugging Face format: a ``.jinja`` file or the template text itself.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from collie.data.collate import IGNORE_INDEX
from collie.data.templates import (TEMPLATES, ChatTemplate, alpaca_template, chatml_template,  # noqa: F401
                                   register_template, resolve_template)
from collie.data.tokenizer import SentencePieceTokenizer
from collie.errors import DataError

logger = logging.getLogger("collie")

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
ROLE_CHOICES = {"role": "system, user, assistant", "from": "system, human, gpt"}


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
    chat = resolve_template(template, tokenizer)
    stats, samples = InstructionStats(), []
    for where, record in (item for path in files for item in read_records(path)):
        stats.records += 1
        ids, labels = encode_conversation(chat.segments(record_to_messages(record, where), tokenizer), tokenizer,
                                          chat.eos_after_response)
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
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = _decode(raw, f"{path}, line {number}")
                if line.strip():
                    yield f"{path}, line {number}", _parse_json(line, f"{path}, line {number}")
    elif path.suffix == ".json":
        records = _parse_json(_decode(path.read_bytes(), str(path)), str(path))
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


def encode_conversation(segments: list[tuple[str, bool]], tokenizer,
                        eos_after_response: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels: BOS first, EOS after each response unless the template already ends it so (or
    ``eos_after_response`` is False: the template's end-of-turn marker ends it); labels are IGNORE_INDEX except
    on response tokens."""
    eos, ids, labels = tokenizer.eos_token_id, [], []
    for text, is_response in segments:
        tokens = encode_text(text, tokenizer)
        if is_response and eos_after_response and eos is not None and eos not in tokens:
            tokens.append(eos)
        ids += tokens
        labels += tokens if is_response else [IGNORE_INDEX] * len(tokens)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:  # chat templates often render the BOS themselves
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def encode_text(text: str, tokenizer) -> list[int]:
    """``tokenizer.encode(text)``; a tokenizer that reads no special tokens in text (sentencepiece) gets its
    BOS/EOS pieces (``<s>``, ``</s>``, as chat templates render them) as their ids."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.encode(text)
    specials = {tokenizer.sp.id_to_piece(i): i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id)
                if i is not None}
    if not specials:
        return tokenizer.encode(text)
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        ids += [specials[part]] if part in specials else (tokenizer.encode(part) if part else [])
    return ids


def encode_chat_prompt(messages: list[dict], template, tokenizer) -> list[int]:
    """The ids a model trained with ``template`` is prompted with to answer ``messages`` (ending with a user
    turn): the training encoding of the conversation followed by the template's assistant prefix."""
    try:
        segments = template.segments(messages + [{"role": "assistant", "content": ""}], tokenizer)
    except DataError:  # a template that cannot be split into turns (training refuses it): its prompt as a whole
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=template.chat_template)
        segments = [(text, False), ("", True)]
    ids, _ = encode_conversation(segments[:-1], tokenizer, template.eos_after_response)
    return ids


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
        raise DataError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to be a record") from None


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 at byte {e.start} ({raw[e.start]:#04x}); save the data as "
                        f"UTF-8") from None
