import json

import pytest
import torch

from collie.data.collate import IGNORE_INDEX, pad_collate
from collie.data.instruction import load_instruction_dataset, truncate
from collie.data.synthetic import generate_examples, main as write_synthetic, rendered_text
from collie.data.tokenizer import load_tokenizer, train_sentencepiece
from collie.errors import ConfigError, DataError
from test_tokenizer import CHATML, save_hf_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What comes after 41?"},
        {"role": "assistant", "content": "42"}, {"role": "user", "content": "Is 42 even or odd?"},
        {"role": "assistant", "content": "even"}]
CHAT_RECORD = {"messages": CHAT}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = rendered_text(generate_examples(400, seed=1)) + ["<|im_start|>user\n<|im_end|>\n Be brief."]
    return load_tokenizer(train_sentencepiece(texts, tmp_path_factory.mktemp("sp") / "tok", vocab_size=400))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def label_spans(sample) -> list[list[int]]:
    """Runs of consecutive label tokens, checking that labels copy input_ids wherever they are set."""
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    spans, previous = [], IGNORE_INDEX
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


def test_alpaca_labels_exactly_the_response(tok, tmp_path):
    record = {"instruction": "Reverse the digits", "input": "4720", "output": "0274"}
    data, stats = load_instruction_dataset(write_jsonl(tmp_path / "a.jsonl", [record]), tok, 64)
    sample = data[0]
    assert label_spans(sample) == [tok.encode("0274") + [tok.eos_token_id]]
    assert sample["input_ids"][0] == tok.bos_token_id and sample["labels"][0] == IGNORE_INDEX
    prompt = tok.decode(sample["input_ids"][sample["labels"] == IGNORE_INDEX])
    assert prompt.startswith("Below is an instruction") and "### Instruction:\nReverse the digits\n\n4720" in prompt
    assert prompt.endswith("### Response:\n")
    assert (stats.records, stats.truncated, stats.skipped, stats.label_tokens) == (1, 0, 0, len(tok.encode("0274")) + 1)


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_every_assistant_turn_is_a_response_span(tok, tmp_path, template):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CHAT]
    files = [write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]),
             write_jsonl(tmp_path / "s.jsonl", [{"conversations": sharegpt}])]
    data, stats = load_instruction_dataset(files, tok, 256, template=template)
    assert stats.truncated == 0
    expected = [tok.encode("42") + [tok.eos_token_id], tok.encode("even") + [tok.eos_token_id]]
    assert label_spans(data[0]) == expected
    assert torch.equal(data[0]["input_ids"], data[1]["input_ids"])  # ShareGPT and messages render alike
    assert "Be brief." in tok.decode(data[0]["input_ids"])


def test_tokenizer_chat_template_spans(tmp_path):
    hf = load_tokenizer(save_hf_tokenizer(tmp_path / "hf"))
    data, _ = load_instruction_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), hf, 128,
                                       template="tokenizer")
    ids = data[0]["input_ids"].tolist()
    assert label_spans(data[0]) == [hf.encode("42<|im_end|>\n"), hf.encode("even<|im_end|>\n")]
    assert ids.count(hf.bos_token_id) == 1 and ids[0] == hf.bos_token_id
    assert ids.count(hf.eos_token_id) == 5  # one per turn: no extra EOS after the template's own
    assert hf.hf.decode(ids[1:]) == hf.apply_chat_template(CHAT)


def test_template_choice_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok"}])
    with pytest.raises(ConfigError, match="has no chat template.*data.template: alpaca"):
        load_instruction_dataset(path, tok, 64, template="tokenizer")
    with pytest.raises(ConfigError, match="did you mean 'chatml'.*alpaca, chatml, internlm2, llama2, llama3, mistral, qwen2, tokenizer"):
        load_instruction_dataset(path, tok, 64, template="chatm")


def test_truncation_keeps_the_response_and_counts(tok, tmp_path):
    long_prompt = {"instruction": "Is 4817 even or odd? " * 20, "output": "odd"}
    long_answer = {"instruction": "Count.", "output": " ".join(str(i) for i in range(100))}
    data, stats = load_instruction_dataset(write_jsonl(tmp_path / "a.jsonl", [long_prompt, long_answer]), tok, 48)
    assert (stats.records, stats.truncated, stats.skipped) == (2, 2, 0)
    kept_prompt, cut_answer = data[0], data[1]
    assert len(kept_prompt["input_ids"]) == len(cut_answer["input_ids"]) == 48
    assert label_spans(kept_prompt) == [tok.encode("odd") + [tok.eos_token_id]]
    assert tok.decode(kept_prompt["input_ids"]).endswith("### Response:\n odd")  # prompt lost its left end
    [answer] = label_spans(cut_answer)
    assert answer == tok.encode(long_answer["output"])[:len(answer)]  # the response end was cut: no EOS
    assert cut_answer["input_ids"][0] == tok.bos_token_id
    assert len(cut_answer["input_ids"]) - len(answer) == 1 + 16  # BOS + min_prompt_tokens of the prompt's end
    assert tok.decode(cut_answer["input_ids"][:-len(answer)]).endswith("Count.\n\n### Response:\n")


def test_records_whose_response_cannot_fit_are_skipped_and_counted(tok, tmp_path):
    records = [{"instruction": "Hi", "output": "ok"}, {"instruction": "word " * 100, "output": "ok"}]
    data, stats = load_instruction_dataset(write_jsonl(tmp_path / "a.jsonl", records), tok, 40, min_prompt_tokens=40)
    assert (len(data), stats.skipped, stats.truncated) == (1, 1, 0)
    assert "1 skipped" in str(stats)


def test_truncate_rules():
    ids, labels = [1, 10, 11, 12, 13, 20, 21, 2], [-100] * 5 + [20, 21, 2]
    assert truncate(ids, labels, 8, 1, 0) == (ids, labels, "kept")
    assert truncate(ids, labels, 6, 1, 0) == ([1, 12, 13, 20, 21, 2], [-100] * 3 + [20, 21, 2], "truncated")
    assert truncate(ids, labels, 6, 1, 3) == ([1, 11, 12, 13, 20, 21], [-100] * 4 + [20, 21], "truncated")
    assert truncate(ids, labels, 5, 1, 4)[2] == "skipped"


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "hi"}', r"a.jsonl, line 2: missing text field 'output'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     r"a.jsonl, line 2: messages\[1\]: missing text field 'content'"),
    ('{"conversations": [{"from": "bot", "value": "hi"}]}', r"line 2: conversations\[0\].*'from'.*human, gpt"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"line 2: no assistant turn"),
    ('{"instruction": "hi", "output": ', r"a.jsonl, line 2: invalid JSON"),
    ('["not", "a", "record"]', r"line 2: expected a JSON object"),
])
def test_malformed_records_name_file_line_and_field(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok"}, line])
    with pytest.raises(DataError, match=message):
        load_instruction_dataset(path, tok, 64)


def test_file_errors(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable instruction records in .*empty.jsonl"):
        load_instruction_dataset(tmp_path / "empty.jsonl", tok, 64)
    with pytest.raises(DataError, match="missing.jsonl' does not exist"):
        load_instruction_dataset(tmp_path / "missing.jsonl", tok, 64)
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": "hi"}]))
    with pytest.raises(DataError, match="a.json, record 2: missing text field 'output'"):
        load_instruction_dataset(tmp_path / "a.json", tok, 64)


def test_packing_restarts_positions_and_keeps_label_masks(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", generate_examples(20, seed=3))
    plain, _ = load_instruction_dataset(path, tok, 128)
    packed, stats = load_instruction_dataset(path, tok, 128, pack=True)
    assert stats.records == 20 and len(packed) == stats.sequences < 20
    assert torch.equal(torch.cat([s["labels"] for s in packed]), torch.cat([s["labels"] for s in plain]))
    for sample in packed:
        assert len(sample["input_ids"]) <= 128
        starts = (sample["position_ids"] == 0).nonzero().flatten().tolist()
        assert starts == (sample["input_ids"] == tok.bos_token_id).nonzero().flatten().tolist()
        lengths = torch.diff(torch.tensor(starts + [len(sample["input_ids"])])).tolist()
        assert torch.equal(sample["position_ids"], torch.cat([torch.arange(n) for n in lengths]))


def test_pad_collate():
    batch = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, -100, 6])},
             {"input_ids": torch.tensor([1, 7, 8, 9, 2]), "labels": torch.tensor([-100, -100, 8, 9, 2])}]
    out = pad_collate(batch, pad_token_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[1, 5, 6, 0, 0, 0, 0, 0], [1, 7, 8, 9, 2, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6] + [-100] * 5, [-100, -100, 8, 9, 2] + [-100] * 3]
    assert out["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
    assert out["position_ids"].tolist() == [list(range(8))] * 2
    assert out["num_tokens"] == 4
    assert pad_collate(batch, 0)["input_ids"].shape == (2, 5)
    packed = [{**batch[1], "position_ids": torch.tensor([0, 1, 0, 1, 2])}]
    assert pad_collate(packed, 0, 4)["position_ids"].tolist() == [[0, 1, 0, 1, 2, 5, 6, 7]]


def test_synthetic_task_is_deterministic_and_held_out(tmp_path):
    assert generate_examples(50, seed=0) == generate_examples(50, seed=0) != generate_examples(50, seed=1)
    write_synthetic([str(tmp_path), "--train", "200", "--eval", "40", "--vocab-size", "400"])
    train, held_out = ([json.loads(line) for line in open(tmp_path / name)] for name in ("train.jsonl", "eval.jsonl"))
    train_questions = {r["instruction"] for r in train}
    assert len(train_questions) == 200 and len(held_out) == 40
    assert not train_questions & {r["instruction"] for r in held_out}
    data, stats = load_instruction_dataset([tmp_path / "eval.jsonl"], load_tokenizer(tmp_path / "tokenizer.model"), 64)
    assert stats.truncated == stats.skipped == 0 and len(data) == 40


def test_chat_template_from_the_config_with_a_sentencepiece_tokenizer(tok, tmp_path):
    (tmp_path / "chat.jinja").write_text(CHATML)
    data, _ = load_instruction_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tok, 256,
                                       template=str(tmp_path / "chat.jinja"))
    eos = tok.eos_token_id  # a sentencepiece EOS is a control token the text cannot hold: it is appended
    assert label_spans(data[0]) == [tok.encode("42<|im_end|>\n") + [eos], tok.encode("even<|im_end|>\n") + [eos]]
    assert tok.decode(data[0]["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_chat_template_from_the_config_replaces_the_tokenizers(tmp_path):
    hf = load_tokenizer(save_hf_tokenizer(tmp_path / "hf", chat_template=None))
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    data, _ = load_instruction_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), hf, 128,
                                       template=template)
    assert label_spans(data[0]) == [hf.encode("42<|im_end|>\n"), hf.encode("even<|im_end|>\n")]
    assert hf.hf.decode(data[0]["input_ids"][1:]) == hf.apply_chat_template(CHAT, chat_template=template)
    with pytest.raises(ConfigError, match="chat template file 'missing.jinja' does not exist"):
        load_instruction_dataset(tmp_path / "m.jsonl", hf, 128, template="missing.jinja")


def test_truncation_that_drops_a_later_assistant_turn_is_counted(tok, tmp_path, caplog):
    long_first = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 " * 6},
                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "no"}]
    data, stats = load_instruction_dataset(write_jsonl(tmp_path / "m.jsonl", [{"messages": long_first}, CHAT_RECORD]),
                                           tok, 64)
    assert (stats.truncated, stats.dropped_responses, stats.skipped) == (1, 1, 0)
    assert len(label_spans(data[0])) == 1 and len(data[0]["input_ids"]) == 64
    assert "losing 1 whole later assistant turns" in str(stats)
    assert "1 whole assistant turns dropped" in caplog.text


def test_seq_len_beyond_the_model_positions_is_a_config_error(tok, tmp_path):
    from collie import CollieConfig
    from collie.models import load_card
    from collie.builders import build_dataset
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok"}])
    cfg = CollieConfig.from_dict({"data": {"train_files": [str(path)], "seq_len": 1024}})
    with pytest.raises(ConfigError, match="data.seq_len=1024 exceeds the model's max_position_embeddings=512"):
        build_dataset(cfg, tok, [str(path)], load_card("tiny"))
