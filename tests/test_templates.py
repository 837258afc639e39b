"""Named chat templates equal each family's official chat template token for token (tests/fixtures/templates/),
with labels on exactly the assistant turns; the Jinja saved with a model renders what training used.

The tokenizer is trained here with every family's special tokens. Its pre-tokenizer isolates whitespace, so that
tokenizing a conversation segment by segment (as training does, to know the label mask) and tokenizing it whole
agree: what is compared is the rendered text and the mask, not BPE merges across segment boundaries.
"""
import json
from pathlib import Path

import pytest

from collie.data.instruction import encode_chat_prompt, encode_conversation, load_instruction_dataset
from collie.data.templates import TEMPLATES, register_template, resolve_template
from collie.data.tokenizer import HFTokenizer, load_tokenizer, train_sentencepiece
from collie.loss import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
SPECIALS = ["<pad>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
FAMILIES = {"llama2": ("<s>", "</s>", " </s>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
            "mistral": ("<s>", "</s>", "</s>"), "qwen2": (None, "<|im_end|>", "<|im_end|>\n"),
            "internlm2": ("<s>", "</s>", "<|im_end|>\n")}  # BOS, EOS, what ends an assistant turn
SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "What comes after 41?"}, {"role": "assistant", "content": "42"},
         {"role": "user", "content": " Is 42 even or odd? "}, {"role": "assistant", "content": "even "},
         {"role": "user", "content": "And 7?"}, {"role": "assistant", "content": "odd, [INST] is text"}]
CONVERSATIONS = {"system": [SYSTEM] + TURNS, "no_system": TURNS, "one_turn": TURNS[:2]}


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for m in CONVERSATIONS["system"]] * 5 + ["[INST] [/INST] <<SYS>> <</SYS>> system user "
                                                                   "assistant ### Instruction: Response:"] * 5
    tok.train_from_iterator(texts, trainer)
    return tok


def family_tokenizer(bpe, family) -> HFTokenizer:
    from transformers import PreTrainedTokenizerFast
    bos, eos, _ = FAMILIES[family]
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token="<pad>"))


def official(family: str) -> str:
    return (FIXTURES / f"{family}.jinja").read_text().removesuffix("\n")


def load(tok, messages, template, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    data, _ = load_instruction_dataset(path, tok, 1024, template=template)
    return data[0]["input_ids"].tolist(), data[0]["labels"].tolist()


def official_ids_and_labels(tok, messages, template):
    """The official rendering tokenized whole; labelled: the tokens inside the text an assistant turn adds."""
    render = lambda ms, gen=False: tok.hf.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen,
                                                              chat_template=template)
    spans = [(len(render(messages[:i], gen=True)), len(render(messages[:i + 1])))
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    encoded = tok.hf(render(messages), add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


def label_texts(tok, ids, labels) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids + [0], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tok.hf.decode(current))
            current = []
    return spans


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_named_template_equals_the_official_one(bpe, tmp_path, family, conversation):
    tok, messages = family_tokenizer(bpe, family), CONVERSATIONS[conversation]
    reference = messages
    if family == "mistral" and messages[0]["role"] == "system":  # v0.2 has no system role: collie prepends it
        reference = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                     *messages[2:]]
    ids, labels = load(tok, messages, family, tmp_path)
    expected_ids, expected_labels = official_ids_and_labels(tok, reference, official(family))
    assert ids == expected_ids
    assert labels == expected_labels
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    strip = family in ("llama2", "llama3")  # their templates trim contents
    end = FAMILIES[family][2]
    lead = " " if family == "llama2" else ""
    assert label_texts(tok, ids, labels) == [lead + (a.strip() if strip else a) + end for a in answers]


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"tokenizer"}))
def test_saved_jinja_renders_what_training_used(bpe, tmp_path, name):
    """chat_template.jinja (what transformers and collie generate apply) gives the training ids, and the
    generation prompt is the training prefix of the next assistant turn."""
    tok = family_tokenizer(bpe, name if name in FAMILIES else "internlm2")
    template, messages = resolve_template(name, tok), CONVERSATIONS["system"]
    ids, _ = load(tok, messages, name, tmp_path)
    text = tok.hf.apply_chat_template(messages, tokenize=False, chat_template=template.jinja(tok))
    with_bos = lambda ids: ids if tok.bos_token_id in (None, ids[0]) else [tok.bos_token_id] + ids
    assert with_bos(tok.encode(text)) == ids
    prompt = tok.hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                        chat_template=template.jinja(tok))
    assert encode_chat_prompt(messages[:-1], template, tok) == with_bos(tok.encode(prompt))
    assert ids[:len(encode_chat_prompt(messages[:-1], template, tok))] == encode_chat_prompt(messages[:-1],
                                                                                             template, tok)


def test_a_family_added_later_plugs_in(bpe, tmp_path):
    jinja = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}"
             "{% else %}{{ m['role'].upper() + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    register_template("vicuna_like", chat_template=jinja, eos_after_response=False)
    try:
        tok = family_tokenizer(bpe, "llama2")
        ids, labels = load(tok, TURNS[:2], "vicuna_like", tmp_path)
        assert label_texts(tok, ids, labels) == [" 42</s>"]
    finally:
        TEMPLATES.pop("vicuna_like")


def test_sentencepiece_reads_bos_and_eos_pieces_in_family_templates(tmp_path):
    sp = load_tokenizer(train_sentencepiece([m["content"] for m in TURNS] * 5, tmp_path / "sp", vocab_size=300))
    template = resolve_template("llama2", sp)
    ids, labels = encode_conversation(template.segments(TURNS[:4], sp), sp, template.eos_after_response)
    assert ids.count(sp.bos_token_id) == 2 and ids.count(sp.eos_token_id) == 2  # one per turn, as ids
    assert ids[0] == sp.bos_token_id and labels[ids.index(sp.eos_token_id)] == sp.eos_token_id
    answered = sp.decode([t for t in labels if t != IGNORE_INDEX])
    assert "<s>" not in sp.decode(ids) and answered.split() == ["42", "even"]


def test_generation_prompt_of_a_template_that_training_cannot_split(bpe):
    """A chat template that is no prefix of its continuation (here: it counts the messages) cannot train, but a
    model that ships one still gets its generation prompt, rendered whole."""
    from collie.data.templates import ChatTemplate
    tok = family_tokenizer(bpe, "qwen2")
    jinja = ("{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    template = ChatTemplate("counting", jinja)
    with pytest.raises(Exception, match="does not render a conversation as a prefix"):
        template.segments(TURNS[:2], tok)
    prompt = tok.hf.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True, chat_template=jinja)
    assert encode_chat_prompt(TURNS[:1], template, tok) == tok.encode(prompt)
