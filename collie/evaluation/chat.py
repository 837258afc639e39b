"""An interactive chat with a saved model: the chat template it was trained with, the conversation's history, and
the answer streamed as it is generated (``collie chat DIR``)."""
from __future__ import annotations

import os
from typing import Callable

from collie.errors import ConfigError

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def find_chat_template(model_dir, tokenizer, tokenizer_path=None, name: str | None = None):
    """The template to chat with: ``name`` (``--template``: a registered name or a .jinja file), else the one
    saved with the model (or its tokenizer), else None."""
    from collie.data.templates import load_chat_template, resolve_template
    if name:
        return resolve_template(name, tokenizer)
    for directory in (model_dir, tokenizer_path):
        if directory and os.path.isdir(directory):
            template = load_chat_template(directory, tokenizer)
            if template is not None:
                return template
    return None


def chat_session(model, tokenizer, template, read_line: Callable[[], str | None], write: Callable[[str], None],
                 warn: Callable[[str], None], system: str | None = None, max_new_tokens: int = 256,
                 **sampling) -> list[dict]:
    """Answer each line ``read_line`` returns (None at the end of input; ``/exit`` ends, ``/reset`` forgets the
    history), streaming every answer through ``write``; returns the conversation. The oldest turns are dropped
    when the conversation no longer fits the model's context."""
    from collie.evaluation.generation import generate_reply
    require_template(template)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while (line := read_line()) is not None and line.strip() not in EXIT_COMMANDS:
        if line.strip() == RESET_COMMAND:
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        messages = fit_context(messages, model, tokenizer, template, max_new_tokens, len(start))
        reply = generate_reply(model, tokenizer, messages, template, max_new_tokens, stream=write, **sampling)
        write("\n")
        if not reply.strip():
            warn("the model generated nothing for this turn (its first token ended the turn)")
        messages.append({"role": "assistant", "content": reply})
    return messages


def require_template(template) -> None:
    if template is None:
        raise ConfigError("no chat template: the model directory holds no chat_template.jinja and its tokenizer "
                          "has none; name one with --template (alpaca, chatml, llama3, … or a .jinja file)")


def fit_context(messages: list[dict], model, tokenizer, template, max_new_tokens: int, keep: int) -> list[dict]:
    """``messages`` without their oldest exchanges (after the first ``keep``) until prompt + answer fit."""
    from collie.data.instruction import encode_chat_prompt
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    while limit and len(messages) > keep + 1 and \
            len(encode_chat_prompt(messages, template, tokenizer)) + max_new_tokens > limit:
        messages = messages[:keep] + messages[keep + 2:]
    return messages
