from pathlib import Path

import pytest

from collie.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece
from collie.errors import DataError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = [f"Question {i}: what comes after {i * 37}?\nAnswer: {i * 37 + 1}." for i in range(200)]


def save_hf_tokenizer(directory: Path, chat_template: str | None = CHATML, pad: bool = True) -> Path:
    """A small byte-level BPE tokenizer built in code and saved like a hub tokenizer (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS + ["hello there, how are you? fine thanks"], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                 pad_token="<pad>" if pad else None)
    hf.chat_template = chat_template
    hf.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(TEXTS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=300)


def test_sentencepiece_train_load_round_trip(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 3, 300)
    text = "Question 7: what comes after 259?\nAnswer:  260. (ünïcode ✓)"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in tok.encode(text)
    assert tok.decode(ids) == text  # newlines, double spaces and unseen characters (byte fallback) survive
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("259")]
    assert "".join(digits).lstrip("▁") == "259" and all(len(p.lstrip("▁")) <= 1 for p in digits)
    assert tok.chat_template is None
    with pytest.raises(DataError, match="data.template: alpaca"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_training_is_deterministic_and_reads_files(sp_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    from_file = train_sentencepiece([corpus], tmp_path / "a", vocab_size=300)
    assert from_file.read_bytes() == train_sentencepiece(str(corpus), tmp_path / "b", vocab_size=300).read_bytes()
    assert train_sentencepiece(TEXTS, tmp_path / "c", vocab_size=300).read_bytes() == sp_model.read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_sentencepiece(tmp_path / "missing.txt", tmp_path / "d", vocab_size=300)


def test_directory_holding_only_tokenizer_model(sp_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300


def test_hf_tokenizer_directory(tmp_path):
    tok = load_tokenizer(save_hf_tokenizer(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_token_id == tok.hf.convert_tokens_to_ids("<s>")
    assert tok.eos_token_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.hf.convert_tokens_to_ids("<pad>")
    assert tok.vocab_size == len(tok.hf)
    ids = tok.encode("hello there", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "hello there"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.apply_chat_template(messages) == rendered
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_hf_pad_falls_back_to_eos_and_missing_template_is_explained(tmp_path):
    tok = load_tokenizer(save_hf_tokenizer(tmp_path, chat_template=None, pad=False))
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.chat_template is None
    with pytest.raises(DataError, match="no chat template.*data.template: alpaca"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_paths_that_are_not_tokenizers_are_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist.*sentencepiece .model"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(DataError, match="vocab.txt.*not a sentencepiece .model"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="broken.model.*not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "broken.model")
