"""Tokenizers behind one small protocol, and offline sentencepiece training.

Every tokenizer collie uses offers ``encode(text, add_bos=False, add_eos=False)``, ``decode(ids)`` (special
tokens skipped), ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``vocab_size``, ``chat_template`` and
``apply_chat_template(messages, add_generation_prompt=False, chat_template=None)`` (``chat_template`` renders with
a given Jinja template instead of the tokenizer's own). ``load_tokenizer`` picks the implementation from the path.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from collie.errors import DataError

EXPECTED = ("a Hugging Face tokenizer directory (tokenizer.json or tokenizer_config.json), "
            "a sentencepiece .model file, or a directory holding tokenizer.model")
MIN_VOCAB_SIZE = 16  # fewer pieces cannot spell text: a broken or empty tokenizer definition
SANITY_TEXT = "Hello, world! The answer is 42."


class HFTokenizer:
    """A ``transformers`` tokenizer seen through collie's protocol."""

    def __init__(self, tokenizer, name: str = ""):
        self.hf = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "tokenizer")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        return _add_special(ids, self.bos_token_id if add_bos else None, self.eos_token_id if add_eos else None)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad token, else EOS, else 0 (padding is masked out of attention and loss anyway)."""
        return _first_id(self.hf.pad_token_id, self.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike ``hf.vocab_size``

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tokenizer files, as ``AutoTokenizer.from_pretrained(directory)`` and ``load_tokenizer`` read them."""
        self.hf.save_pretrained(directory)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None) -> str:
        if not (chat_template or self.chat_template):
            raise _no_chat_template(self.name)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)


class SentencePieceTokenizer:
    """A sentencepiece model (e.g. Llama-2's ``tokenizer.model``) seen through collie's protocol."""

    chat_template = None

    def __init__(self, path: str | os.PathLike):
        import sentencepiece
        self.name = str(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.name)
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer '{path}' is not a valid sentencepiece model ({e}); expected {EXPECTED}") from e

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return _add_special(self.sp.encode(text), self.bos_token_id if add_bos else None,
                            self.eos_token_id if add_eos else None)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])  # control tokens (bos/eos/pad) decode to nothing

    @property
    def bos_token_id(self) -> int | None:
        return _id_or_none(self.sp.bos_id())

    @property
    def eos_token_id(self) -> int | None:
        return _id_or_none(self.sp.eos_id())

    @property
    def pad_token_id(self) -> int:
        """The model's pad piece, else EOS, else 0 (padding is masked out of attention and loss anyway)."""
        return _first_id(_id_or_none(self.sp.pad_id()), self.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            chat_template: str | None = None) -> str:
        """Render with ``chat_template`` (Jinja, as in Hugging Face) given ``bos_token``/``eos_token`` as text; a
        sentencepiece model has no template of its own."""
        if not chat_template:
            raise _no_chat_template(self.name)
        return render_chat_template(chat_template, messages, add_generation_prompt,
                                    bos_token=self._piece(self.bos_token_id), eos_token=self._piece(self.eos_token_id))

    def _piece(self, token_id: int | None) -> str:
        return "" if token_id is None else self.sp.id_to_piece(token_id)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Copy the model file to ``directory/tokenizer.model`` (where ``load_tokenizer`` looks)."""
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.name, os.path.join(directory, "tokenizer.model"))


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | SentencePieceTokenizer:
    """The tokenizer at ``path``: an HF tokenizer directory, a sentencepiece ``.model`` file, or a directory
    holding only ``tokenizer.model``. Never downloads: a hub name that is not a local path is an error. The
    tokenizer is sanity-checked (``check_tokenizer``) before it is returned."""
    return check_tokenizer(_load(Path(path)))


def check_tokenizer(tokenizer):
    """``tokenizer`` if it can tokenize text: more than a handful of pieces, an EOS token (pad falls back to
    it), special ids inside the vocabulary, and a sample text that survives encode → decode (ignoring case and
    whitespace). A directory with only ``tokenizer_config.json`` loads in some transformers versions as a
    tokenizer that turns every record into BOS + EOS; this refuses it."""
    name, size = getattr(tokenizer, "name", type(tokenizer).__name__), tokenizer.vocab_size
    if size < MIN_VOCAB_SIZE:
        raise DataError(f"tokenizer '{name}' has {size} tokens (fewer than {MIN_VOCAB_SIZE}): its vocabulary is "
                        f"missing or broken; expected {EXPECTED}")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer '{name}' has no EOS token, which ends every response and document; set "
                        f"eos_token in its tokenizer_config.json")
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None and not 0 <= token_id < size:
            raise DataError(f"tokenizer '{name}': {role}_token_id={token_id} is outside its vocabulary of {size}")
    ids = tokenizer.encode(SANITY_TEXT)
    decoded = tokenizer.decode(ids) if ids and all(0 <= i < size for i in ids) else ""
    if "".join(decoded.split()).lower() != "".join(SANITY_TEXT.split()).lower():
        raise DataError(f"tokenizer '{name}' does not reproduce text: {SANITY_TEXT!r} encodes to {ids[:12]} and "
                        f"decodes to {decoded!r}; its vocabulary is missing or broken (expected {EXPECTED})")
    return tokenizer


def _load(path: Path) -> HFTokenizer | SentencePieceTokenizer:
    path = Path(path)
    if not path.exists():
        from collie.models.hf_io import local_path_hint
        raise DataError(f"tokenizer '{path}' does not exist; expected {EXPECTED}; {local_path_hint(path)}")
    if path.is_file():
        if path.suffix != ".model":
            raise DataError(f"tokenizer '{path}' is a file but not a sentencepiece .model; expected {EXPECTED}")
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return _load_hf(path)
    if (path / "tokenizer.model").exists():
        return SentencePieceTokenizer(path / "tokenizer.model")
    raise DataError(f"tokenizer directory '{path}' holds no tokenizer files; expected {EXPECTED}")


def _load_hf(path: Path) -> HFTokenizer:
    import warnings
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its advice ("install sentencepiece …") would be stray stderr lines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True), name=str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"could not load the Hugging Face tokenizer in '{path}': {reason}; expected "
                        f"{EXPECTED}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         **variables) -> str:
    """Render a Hugging Face-style Jinja chat template (sandboxed, trim_blocks/lstrip_blocks like transformers)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **variables)
    except TemplateError as e:
        raise DataError(f"the chat template does not render: {e}") from e


def train_sentencepiece(source, model_prefix: str | os.PathLike, vocab_size: int, **options) -> Path:
    """Train a sentencepiece model offline and write ``{model_prefix}.model``; returns its path.

    ``source`` is a file path (str or PathLike), a list of ``pathlib.Path`` files, or any other iterable of
    text strings (one training "sentence" each). Defaults, overridable through ``options`` (any
    ``SentencePieceTrainer`` flag): Llama-style BPE with ``split_digits`` and ``byte_fallback`` (no unknown
    characters), ``character_coverage=1.0``, identity normalization that keeps newlines and repeated spaces,
    and ids unk=0, bos=1, eos=2, pad=3 (a real pad piece, so padding never aliases EOS). Training is
    single-threaded over the whole input in order, hence deterministic.
    """
    import sentencepiece
    settings = dict(model_type="bpe", vocab_size=vocab_size, character_coverage=1.0, split_digits=True,
                    byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, shuffle_input_sentence=False,
                    input_sentence_size=0, hard_vocab_limit=True, minloglevel=2)
    settings.update(options)
    files = _as_files(source)
    if files is not None:
        settings["input"] = ",".join(files)
    else:
        settings["sentence_iterator"] = iter(source)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(model_writer=model, **settings)
    out = Path(f"{model_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def _as_files(source) -> list[str] | None:
    """File paths named by ``source``, or None when it is an iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    elif not (isinstance(source, (list, tuple)) and source and all(isinstance(s, os.PathLike) for s in source)):
        return None
    missing = [str(f) for f in source if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"sentencepiece training files not found: {', '.join(missing)}")
    return [str(f) for f in source]


def _add_special(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    return ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])


def _id_or_none(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None  # sentencepiece reports a disabled piece as -1


def _first_id(*ids: int | None) -> int:
    return next((i for i in ids if i is not None), 0)


def _no_chat_template(name: str) -> DataError:
    return DataError(f"tokenizer '{name}' has no chat template; set data.template: alpaca (or chatml) to use "
                     f"a built-in template, or give a Jinja chat template (a .jinja file) as data.template")
