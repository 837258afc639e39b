"""Batched text generation with a KV cache and left padding: greedy or temperature/top-p sampling, stopping at
EOS or at stop strings.

Left-padded rows get an attention mask and position ids that start at 0 on their first real token, so every row
continues exactly as it would alone. Models whose ``forward`` takes ``cache`` (collie's decoder) feed only the
new token each step; any other ``(ids, position_ids=, attention_mask=) -> logits`` callable recomputes the
whole sequence.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from collie.distributed import full_logits
from collie.errors import ConfigError
from collie.models.components import KVCache


def left_pad(sequences: list[list[int]], pad_id: int, device, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (width a multiple of ``multiple``) and the matching 1/0 attention mask."""
    width = max(len(s) for s in sequences)
    width += -width % multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is negative; use 0 for greedy decoding or a value > 0")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is outside (0, 1]; 1 samples from the whole distribution")


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


def accepts_cache(model) -> bool:
    """Whether ``model``'s forward takes a ``cache`` argument (a ``KVCache``)."""
    try:
        return "cache" in inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):  # builtins and C callables have no signature
        return False


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | Sequence[int] | None, pad_id: int,
             temperature: float = 0.0, top_p: float = 1.0, generator=None, device=None, *,
             stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
             use_cache: bool | None = None, pad_to_multiple_of: int = 1,
             on_step: Callable[[list[list[int]], list[bool]], None] | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens, EOS excluded.

    ``eos_id``: one id or several (a chat template's end-of-turn tokens besides EOS). ``on_step(rows, done)``,
    called after every step with each row's tokens so far and whether it has stopped, lets a caller stream.

    ``model`` is any callable ``(ids, position_ids=, attention_mask=) -> logits`` (tensor-parallel logits are
    gathered); ``device`` defaults to the device of its parameters. A row also stops once ``decode`` of its new
    tokens contains a ``stop`` string; its tokens then end with the one that completed it (``cut_at_stop``
    trims the text). ``use_cache`` defaults to ``accepts_cache(model)``. ``pad_to_multiple_of`` > 1 (tensor
    parallel degree under sequence parallelism, which splits the sequence evenly) left-pads every input to a
    multiple and recomputes the sequence each step: one new token cannot be split.
    """
    check_sampling(temperature, top_p)
    eos_ids = {eos_id} if eos_id is None or isinstance(eos_id, int) else set(eos_id)
    if stop and decode is None:
        raise ConfigError("stop strings need decode= (the tokenizer's decode) to be checked")
    device = device or next(iter(model.parameters())).device
    use_cache = accepts_cache(model) and pad_to_multiple_of == 1 if use_cache is None else use_cache
    cache = KVCache() if use_cache else None
    ids, mask = left_pad(prompts, pad_id, device, pad_to_multiple_of)
    inputs, positions, model_mask = ids, _positions(mask), mask
    lengths = [None] * len(prompts)  # tokens kept per row, set when the row stops
    rows: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        logits = full_logits(model(inputs, position_ids=positions, attention_mask=model_mask,
                                   **({} if cache is None else {"cache": cache})))[:, -1]
        token = sample_next(logits, temperature, top_p, generator)
        done = torch.tensor([n is not None for n in lengths], device=device)
        token = torch.where(done, torch.full_like(token, pad_id), token)  # finished rows only pad
        _record(rows, lengths, token.tolist(), eos_ids, stop, decode)
        if on_step is not None:
            on_step(_kept(rows, lengths), [n is not None for n in lengths])
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if cache is None:
            ids = torch.cat([ids, token[:, None]], dim=1)
            inputs, model_mask = _pad_left(ids, mask, pad_id, pad_to_multiple_of)
            positions = _positions(model_mask)
        else:
            inputs, positions, model_mask = token[:, None], positions[:, -1:] + 1, mask
        if all(n is not None for n in lengths):
            break
    return _kept(rows, lengths)


def _kept(rows, lengths) -> list[list[int]]:
    return [row if n is None else row[:n] for row, n in zip(rows, lengths)]


def _pad_left(ids: torch.Tensor, mask: torch.Tensor, pad_id: int, multiple: int):
    extra = -ids.shape[1] % multiple
    if not extra:
        return ids, mask
    return F.pad(ids, (extra, 0), value=pad_id), F.pad(mask, (extra, 0))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _record(rows, lengths, tokens: list[int], eos_ids: set, stop, decode) -> None:
    """Append each running row's token; set its kept length when it hits EOS (excluded) or a stop string."""
    for i, token in enumerate(tokens):
        if lengths[i] is not None:
            continue
        rows[i].append(token)
        if token in eos_ids:
            lengths[i] = len(rows[i]) - 1
        elif stop and any(s in decode(rows[i]) for s in stop):
            lengths[i] = len(rows[i])


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), device=None,
                  template=None) -> list[str]:
    """The continuation text of each prompt (encoded with BOS), cut before the first stop string. Sampling
    draws from a ``torch.Generator`` seeded with ``seed``, so a seed gives the same texts every run.

    ``template`` (a ``collie.data.templates.ChatTemplate``): each prompt is a user turn in that chat template,
    and the answer ends at EOS or at the template's end of turn."""
    device = device or next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if template is None:
        encoded, eos = [tokenizer.encode(p, add_bos=True) for p in prompts], tokenizer.eos_token_id
    else:
        from collie.data.instruction import encode_chat_prompt
        from collie.data.templates import stop_token_ids
        encoded = [encode_chat_prompt([{"role": "user", "content": p}], template, tokenizer) for p in prompts]
        eos, stop = stop_token_ids(template, tokenizer), [*stop, *template.stop]
    outputs = generate(model, encoded, max_new_tokens, eos, tokenizer.pad_token_id,
                       temperature, top_p, generator, device, stop=stop, decode=tokenizer.decode)
    return [cut_at_stop(tokenizer.decode(out), stop) for out in outputs]


def generate_reply(model, tokenizer, messages: list[dict], template, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                   device=None, stream: Callable[[str], None] | None = None) -> str:
    """The assistant's answer to ``messages`` (ending with a user turn) in chat ``template``, as training
    encoded it. ``stream(text)`` receives the answer piece by piece as it is generated."""
    from collie.data.instruction import encode_chat_prompt
    from collie.data.templates import stop_token_ids
    device = device or next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = [*stop, *template.stop]
    streamer = _Streamer(tokenizer.decode, stop, stream) if stream else None
    [out] = generate(model, [encode_chat_prompt(messages, template, tokenizer)], max_new_tokens,
                     stop_token_ids(template, tokenizer), tokenizer.pad_token_id, temperature, top_p, generator,
                     device, stop=stop, decode=tokenizer.decode, on_step=streamer)
    text = cut_at_stop(tokenizer.decode(out), stop)
    if streamer:
        streamer.finish(text)
    return text


class _Streamer:
    """Hands out the text of row 0 as it grows, holding back an end that could still become a stop string."""

    def __init__(self, decode, stop: Sequence[str], write: Callable[[str], None]):
        self.decode, self.stop, self.write, self.sent = decode, [s for s in stop if s], write, 0

    def __call__(self, rows, done):
        text = cut_at_stop(self.decode(rows[0]), self.stop)
        if not done[0]:
            text = text.rstrip("\ufffd")  # a character whose bytes are not all generated yet
            text = text[:len(text) - max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])),
                                         default=0)]
        self._send(text)

    def finish(self, text: str):
        self._send(text)

    def _send(self, text: str):
        if len(text) > self.sent:  # a longer token list decodes to a longer text with the same beginning
            self.write(text[self.sent:])
            self.sent = len(text)
