"""Chat templates by name: how a conversation becomes training text, and the same text at generation time.

A template renders ``[{"role", "content"}]`` as segments ``(text, is_response)``: the label mask is exactly the
response segments. Each registered template also carries a Hugging Face Jinja chat template (``chat_template``)
that renders the same text; it is saved with the model (``chat_template.jinja``, which ``transformers``
reads) so that generation applies what training used.

Built in: ``alpaca`` and ``chatml`` (collie's, EOS after each response), the families ``llama2``, ``llama3``,
``mistral``, ``qwen2`` (ChatML with Qwen's default system prompt) and ``internlm2`` — each renders as the family's
own chat template (tests/test_templates.py compares token ids with the official templates), and a response is
what the template adds for an assistant turn (its content and end-of-turn marker) — plus ``tokenizer`` (the
tokenizer's own chat template). Add a family with ``register_template(name, chat_template=JINJA, stop=(...))``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from collie.errors import ConfigError, DataError
from collie.schema import suggest

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
JINJA_SUFFIXES = (".jinja", ".jinja2", ".j2")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # what transformers reads next to the tokenizer files
TEMPLATE_INFO_FILE = "collie_template.json"  # which template collie trained with (name, EOS rule, stop strings)


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format. ``render(messages, tokenizer) -> [(text, is_response)]`` (default: the Jinja
    ``chat_template`` split at each assistant turn); ``eos_after_response``: training appends the tokenizer's
    EOS to a response that does not already hold it (False: the template's own end-of-turn marker ends it);
    ``stop``: end-of-turn texts where generation stops besides EOS."""
    name: str
    chat_template: str | None = None
    render: Callable | None = None
    eos_after_response: bool = True
    stop: tuple[str, ...] = ()

    def segments(self, messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
        if self.render is not None:
            return self.render(messages, tokenizer)
        return tokenizer_template(messages, tokenizer, chat_template=self.chat_template or None)

    def jinja(self, tokenizer) -> str | None:
        """The Jinja text to save with the model (``tokenizer``: the tokenizer's own)."""
        return self.chat_template or getattr(tokenizer, "chat_template", None)


TEMPLATES: dict[str, ChatTemplate] = {}


def register_template(name: str, chat_template: str | None = None, stop=(), eos_after_response: bool = True):
    """Register ``data.template: name``: a Jinja chat template, or (used as a decorator) a function
    ``fn(messages, tokenizer) -> [(text, is_response), ...]`` with ``chat_template`` its Jinja equivalent."""
    TEMPLATES[name] = ChatTemplate(name, chat_template, None, eos_after_response, tuple(stop))

    def attach(fn):
        TEMPLATES[name] = dataclasses.replace(TEMPLATES[name], render=fn)
        return fn
    return attach


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


ALPACA_JINJA = (
    "{% if messages[0]['role'] != 'system' %}{{ '" + ALPACA_PREAMBLE + "\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")


@register_template("alpaca", chat_template=ALPACA_JINJA)
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


CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@register_template("chatml", chat_template=CHATML_JINJA)
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


register_template("tokenizer")  # the tokenizer's own chat template

# --- model families: Jinja equal to each family's official template on system + user/assistant conversations ---

register_template("llama2", eos_after_response=False, chat_template=(
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"))

register_template("llama3", eos_after_response=False, stop=("<|eot_id|>",), chat_template=(
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"))

# Mistral-Instruct v0.1/v0.2 have no system role; collie puts a system message before the first instruction
register_template("mistral", eos_after_response=False, chat_template=(
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content']"
    " + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"))

register_template("qwen2", eos_after_response=False, stop=("<|im_end|>",), chat_template=(
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))

register_template("internlm2", eos_after_response=False, stop=("<|im_end|>",), chat_template=(
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n'"
    " + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))


# --- lookup ---------------------------------------------------------------------------------------------------

def resolve_template(name: str, tokenizer) -> ChatTemplate:
    """The template named by ``data.template``: a registered name, or a Jinja chat template (file or text)."""
    if name.endswith(JINJA_SUFFIXES) or "{{" in name or "{%" in name:
        return ChatTemplate("jinja", read_chat_template(name))
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


def stop_token_ids(template: ChatTemplate | None, tokenizer) -> list[int]:
    """EOS and every ``stop`` text that is one token: the ids generation stops at."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in template.stop if template else ():
        encoded = tokenizer.encode(text)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


# --- saved with the model ---------------------------------------------------------------------------------------

def save_chat_files(directory: str | os.PathLike, data_cfg, tokenizer) -> None:
    """Next to a saved model: ``chat_template.jinja`` (instruction data: the template training used),
    ``collie_template.json`` (its name, or null after pretraining) and ``generation_config.json`` (BOS, EOS +
    end-of-turn ids, pad)."""
    template = resolve_template(data_cfg.template, tokenizer) if data_cfg.format == "instruction" else None
    jinja = template.jinja(tokenizer) if template else None
    info = {"template": None}  # pretraining: prompts are text to continue, whatever template the tokenizer has
    if jinja:
        Path(directory, CHAT_TEMPLATE_FILE).write_text(jinja, encoding="utf-8")
        info = {"template": template.name, "eos_after_response": template.eos_after_response,
                "stop": list(template.stop)}
    Path(directory, TEMPLATE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    from transformers import GenerationConfig
    eos = stop_token_ids(template, tokenizer)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(directory)


def load_chat_template(directory: str | os.PathLike, tokenizer) -> ChatTemplate | None:
    """The template a saved model was trained with: the registered one ``collie_template.json`` names, else
    ``chat_template.jinja`` or the tokenizer's own chat template; None when there is none or the model was
    pretrained on plain text."""
    info_path, jinja_path = Path(directory, TEMPLATE_INFO_FILE), Path(directory, CHAT_TEMPLATE_FILE)
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    if "template" in info and info["template"] is None:
        return None  # trained on plain text
    jinja = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else tokenizer.chat_template
    if info.get("template") in TEMPLATES and info["template"] != "tokenizer":
        return TEMPLATES[info["template"]]
    if not jinja:
        return None
    return ChatTemplate(info.get("template", "jinja"), jinja, None, info.get("eos_after_response", True),
                        tuple(info.get("stop", ())))


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name", type(tokenizer).__name__)


__all__ = ["ChatTemplate", "TEMPLATES", "load_chat_template", "register_template", "resolve_template",
           "save_chat_files", "stop_token_ids", "tokenizer_template"]


CHAT_FILES = (CHAT_TEMPLATE_FILE, TEMPLATE_INFO_FILE, "generation_config.json")


def copy_tokenizer_and_chat_files(sources, directory: str | os.PathLike) -> bool:
    """A model directory written from others (``collie convert --merge``): the tokenizer and the chat files of the
    first of ``sources`` that holds a tokenizer. Returns whether one was found."""
    import shutil

    from collie.data.tokenizer import load_tokenizer
    for source in sources:
        try:
            tokenizer = load_tokenizer(source)
        except DataError:
            continue
        tokenizer.save_pretrained(directory)
        for name in CHAT_FILES:
            if Path(source, name).is_file():
                shutil.copyfile(Path(source, name), Path(directory, name))
        return True
    return False
