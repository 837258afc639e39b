import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from collie.data.collate import IGNORE_INDEX, pad_collate
from collie.data.loader import BatchStream
from collie.data.pretrain import document_causal_mask, load_pretrain_dataset, write_token_cache
from collie.data.tokenizer import load_tokenizer, train_sentencepiece
from collie.errors import DataError
from test_tokenizer import save_hf_tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "pretrain_sample"
DOCUMENTS = [json.loads(line)["text"] for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
OPTIONS = {"text_field": "text", "txt_documents": "paragraph", "skip_malformed": False}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(SAMPLE / "train.txt", tmp_path_factory.mktemp("sp") / "tok", 400))


class CharTokenizer:
    """Characters as ids above 65535 (forcing uint32 storage); BOS may equal EOS as in GPT-2."""
    name, vocab_size, eos_token_id = "chars", 70000, 3

    def __init__(self, bos_token_id=1):
        self.bos_token_id = bos_token_id

    def encode(self, text, add_bos=False, add_eos=False):
        return [self.bos_token_id] * add_bos + [66000 + ord(c) % 4000 for c in text] + [self.eos_token_id] * add_eos


class Recorder:
    """A dataset that records which indices were read."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.read.append(index)
        return self.dataset[index]


def load(files, tok, tmp_path, seq_len=32, **options):
    return load_pretrain_dataset(files, tok, seq_len, cache_dir=tmp_path / "cache", **options)


def token_stream(tok, documents) -> list[int]:
    return [t for d in documents for t in tok.encode(d, add_bos=True, add_eos=True)]


def concatenated(dataset, key="input_ids") -> list[int]:
    return torch.cat([dataset[i][key] for i in range(len(dataset))]).tolist()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_blocks_concatenate_to_the_token_stream(tok, tmp_path):
    data, stats = load(SAMPLE / "train.jsonl", tok, tmp_path)
    stream = token_stream(tok, DOCUMENTS)
    assert (stats.documents, stats.tokens, stats.blocks) == (len(DOCUMENTS), len(stream), len(stream) // 32)
    assert stats.dropped_tokens == len(stream) % 32 and len(data) == stats.blocks
    assert concatenated(data) == stream[:len(data) * 32]
    assert concatenated(data, "labels") == concatenated(data)
    assert all(data[i]["position_ids"].tolist() == list(range(32)) for i in (0, len(data) - 1))
    assert data.tokens.dtype.name == "uint16" and "400 documents in 1 source ->" in str(stats)
    with pytest.raises(IndexError):
        data[len(data)]


def test_txt_paragraphs_match_jsonl_and_file_mode_keeps_the_file(tok, tmp_path):
    assert concatenated(load(SAMPLE / "train.txt", tok, tmp_path)[0]) == \
        concatenated(load(SAMPLE / "train.jsonl", tok, tmp_path)[0])
    (tmp_path / "a.txt").write_text("First paragraph.\n  \n\n\nSecond one,\nstill second.\n")
    for mode, documents in [("paragraph", ["First paragraph.", "Second one,\nstill second."]),
                            ("file", ["First paragraph.\n  \n\n\nSecond one,\nstill second.\n"])]:
        data, stats = load(tmp_path / "a.txt", tok, tmp_path, seq_len=4, txt_documents=mode)
        assert stats.documents == len(documents)
        assert concatenated(data) + data.tokens[len(data) * 4:].tolist() == token_stream(tok, documents)


def test_jsonl_text_field_and_globs(tok, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCUMENTS[10:20])])
    write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in DOCUMENTS[:10]])
    data, stats = load(str(tmp_path / "*.jsonl"), tok, tmp_path, text_field="body")
    assert stats.files == 2 and concatenated(data) == token_stream(tok, DOCUMENTS[:20])[:len(data) * 32]


def test_parquet_column_and_malformed_rows(tok, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": DOCUMENTS[:20]}), tmp_path / "good.parquet")
    data, _ = load(tmp_path / "good.parquet", tok, tmp_path, text_field="content")
    assert concatenated(data) == token_stream(tok, DOCUMENTS[:20])[:len(data) * 32]
    pq.write_table(pa.table({"content": DOCUMENTS[:2] + [None] + DOCUMENTS[2:20]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, row 2: field 'content' is null, expected a string"):
        load(tmp_path / "bad.parquet", tok, tmp_path, text_field="content")
    assert load(tmp_path / "bad.parquet", tok, tmp_path, text_field="content", skip_malformed=True)[1].malformed == 1
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\); set data.text_field"):
        load(tmp_path / "good.parquet", tok, tmp_path)


def test_saved_hf_dataset(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS[:20], "n": list(range(20))})
    dataset.save_to_disk(tmp_path / "saved")
    data, _ = load(tmp_path / "saved", tok, tmp_path)
    assert concatenated(data) == token_stream(tok, DOCUMENTS[:20])[:len(data) * 32]
    datasets.DatasetDict({"train": dataset}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"DatasetDict with splits train; name one split's directory"):
        load(tmp_path / "dict", tok, tmp_path)


def test_second_load_reuses_the_cache_without_tokenizing(tok, tmp_path, monkeypatch):
    first, stats = load(SAMPLE / "train.jsonl", tok, tmp_path)
    assert not stats.cache_hit
    monkeypatch.setattr(tok, "encode", lambda *a, **k: pytest.fail("the cached corpus was tokenized again"))
    again, stats = load(SAMPLE / "train.jsonl", tok, tmp_path, seq_len=48, document_masking=True)
    assert stats.cache_hit and stats.cache_dir == str(first.cache_dir)
    assert concatenated(again)[:len(again) * 48] == concatenated(first)[:len(again) * 48]


def test_changed_file_options_or_tokenizer_retokenize(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in DOCUMENTS[:20]])
    first = load(path, tok, tmp_path)[1]
    write_jsonl(path, [{"text": d} for d in DOCUMENTS[:21]])
    changed = load(path, tok, tmp_path)[1]
    assert not changed.cache_hit and changed.documents == 21 and changed.cache_dir != first.cache_dir
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # same size, new mtime
    assert not load(path, tok, tmp_path)[1].cache_hit
    assert not load(path, tok, tmp_path, skip_malformed=True)[1].cache_hit
    other = load_tokenizer(train_sentencepiece(DOCUMENTS[:200], tmp_path / "other", 400))
    assert other.vocab_size == tok.vocab_size and not load(path, other, tmp_path)[1].cache_hit
    hf = load_tokenizer(save_hf_tokenizer(tmp_path / "hf"))
    assert [load(path, hf, tmp_path)[1].cache_hit for _ in range(2)] == [False, True]


def test_failed_write_leaves_no_cache_then_rebuilds(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCUMENTS[:20]])
    encode, calls = tok.encode, []

    def flaky_encode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("tokenizer crashed")
        return encode(*args, **kwargs)
    monkeypatch.setattr(tok, "encode", flaky_encode)
    with pytest.raises(RuntimeError):
        load(path, tok, tmp_path)
    assert not (tmp_path / "cache").exists()  # what the failed write created is removed again
    assert not load(path, tok, tmp_path)[1].cache_hit and load(path, tok, tmp_path)[1].cache_hit


def test_process_killed_mid_write_leaves_an_untrusted_temporary(tok, tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": d} for d in DOCUMENTS[:20]])
    crash = ("import os, sys; from collie.data import pretrain; from collie.data.tokenizer import load_tokenizer\n"
             "pretrain.encode_document = lambda *a: os._exit(3)\n"
             "pretrain.load_pretrain_dataset(sys.argv[1], load_tokenizer(sys.argv[2]), 32, cache_dir=sys.argv[3])")
    result = subprocess.run([sys.executable, "-c", crash, str(path), tok.name, str(tmp_path / "cache")])
    assert result.returncode == 3
    assert [p.name.split(".")[1][:4] for p in (tmp_path / "cache").iterdir()] == ["tmp-"]
    data, stats = load(path, tok, tmp_path)
    assert not stats.cache_hit and concatenated(data) == token_stream(tok, DOCUMENTS[:20])[:len(data) * 32]


def test_a_second_writer_keeps_the_published_cache(tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": d} for d in DOCUMENTS[:20]])
    data, _ = load(path, tok, tmp_path)
    before = data.tokens.tolist()
    write_token_cache([path], tok, data.cache_dir, OPTIONS)  # lost the race: its rename finds the cache there
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [data.cache_dir.name]
    assert load(path, tok, tmp_path)[0].tokens.tolist() == before


def test_only_the_main_process_writes_and_barrier_always_runs(tok, tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": d} for d in DOCUMENTS[:20]])
    with pytest.raises(DataError, match="was not written: the main process failed"):
        load(path, tok, tmp_path, is_main_process=False)
    main = []  # the main process writes the cache while this one waits at the barrier
    data, _ = load(path, tok, tmp_path, is_main_process=False, barrier=lambda: main.append(load(path, tok, tmp_path)))
    assert concatenated(data) == concatenated(main[0][0])
    bad, barriers = write_jsonl(tmp_path / "h.jsonl", ["{oops"]), []
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        load(bad, tok, tmp_path, barrier=lambda: barriers.append(1))
    assert barriers == [1]


def test_document_masking_restarts_positions_and_masks_cross_document_targets(tok, tmp_path):
    plain, _ = load(SAMPLE / "train.jsonl", tok, tmp_path)
    masked, _ = load(SAMPLE / "train.jsonl", tok, tmp_path, document_masking=True)
    lengths = [len(tok.encode(d, add_bos=True, add_eos=True)) for d in DOCUMENTS]
    in_document = [p for n in lengths for p in range(n)]
    for i in range(len(masked)):
        block = masked[i]
        assert torch.equal(block["input_ids"], plain[i]["input_ids"])
        expected = [min(p, t) for t, p in enumerate(in_document[i * 32:(i + 1) * 32])]
        assert block["position_ids"].tolist() == expected
        starts = block["position_ids"] == 0
        assert (block["labels"][starts] == IGNORE_INDEX).all()
        assert torch.equal(block["labels"][~starts], block["input_ids"][~starts])
        eos = block["input_ids"][1:] == tok.eos_token_id  # labels[0] is no target: the loss shifts labels
        assert (block["labels"][1:][eos] == tok.eos_token_id).all()  # every document still learns to end


def test_document_causal_mask_blocks_attention_across_documents():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    mask = document_causal_mask(position_ids)
    docs = [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]
    expected = torch.tensor([[[j <= i and d[i] == d[j] for j in range(8)] for i in range(8)] for d in docs])
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool and torch.equal(mask[:, 0], expected)
    q, k, v = torch.randn(3, 1, 2, 8, 4).unbind(0)
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:1])
    separate = torch.cat([F.scaled_dot_product_attention(q[..., s, :], k[..., s, :], v[..., s, :], is_causal=True)
                          for s in (slice(0, 3), slice(3, 5), slice(5, 8))], dim=2)
    torch.testing.assert_close(packed, separate)


@pytest.mark.parametrize("line, message", [
    ("not json", r"line 2: invalid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object with a 'text' field, got an array"),
    ('{"content": "hi"}', r"line 2: missing text field 'text' \(fields: content; set data.text_field"),
    ('{"text": 5}', r"line 2: field 'text' is a number, expected a string"),
])
def test_malformed_records_name_file_line_and_field(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": DOCUMENTS[0]}, line, {"text": DOCUMENTS[1]}])
    with pytest.raises(DataError, match=r"m\.jsonl, " + message):
        load(path, tok, tmp_path, seq_len=8)


def test_skipped_malformed_records_are_counted_and_reported(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": d} for d in DOCUMENTS[:5]] + ["oops", {"text": None}, {}])
    with caplog.at_level(logging.WARNING, logger="collie"):
        stats = load(path, tok, tmp_path, skip_malformed=True)[1]
    assert (stats.documents, stats.malformed) == (5, 3) and "3 malformed records" in str(stats)
    assert "s.jsonl, line 6: invalid JSON" in stats.first_malformed and "3 malformed" in caplog.text
    assert load(path, tok, tmp_path, skip_malformed=True)[1].malformed == 3  # a cache hit still reports them


def test_empty_or_missing_corpus_is_an_error(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no documents in .*empty.txt"):
        load(tmp_path / "empty.txt", tok, tmp_path)
    with pytest.raises(DataError, match=r"no documents .*\(2 empty, 0 malformed"):
        load(write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": " "}]), tok, tmp_path)
    (tmp_path / "short.txt").write_text("A short text.")
    with pytest.raises(DataError, match="tokens are fewer than one block of seq_len=64; add text or lower"):
        load(tmp_path / "short.txt", tok, tmp_path, seq_len=64)
    for files, message in [([], "no data files given"), (tmp_path / "nope.txt", "does not exist"),
                           (str(tmp_path / "*.parquet"), "matches no file"), (tmp_path, "not a dataset saved by")]:
        with pytest.raises(DataError, match=message):
            load(files, tok, tmp_path)
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported type; pretraining reads .txt, .jsonl, .parquet"):
        load(tmp_path / "x.csv", tok, tmp_path)


def test_a_missing_optional_package_names_what_to_install(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"x.parquet' needs the optional package 'pyarrow': pip install pyarrow"):
        load(tmp_path / "x.parquet", tok, tmp_path)


def test_wide_vocabularies_use_uint32_and_shared_bos_eos_is_written_once(tmp_path):
    (tmp_path / "t.txt").write_text("abc\n\nde\n")
    data, _ = load(tmp_path / "t.txt", CharTokenizer(), tmp_path, seq_len=2)
    assert data.tokens.dtype.name == "uint32" and data.tokens.tolist() == [1, 66097, 66098, 66099, 3, 1, 66100,
                                                                          66101, 3]
    gpt2_like, _ = load(tmp_path / "t.txt", CharTokenizer(bos_token_id=3), tmp_path, seq_len=2)
    assert gpt2_like.tokens.tolist() == [66097, 66098, 66099, 3, 66100, 66101, 3]


def test_batch_stream_over_blocks_resumes_without_repeats_or_skips(tok, tmp_path):
    data, _ = load(SAMPLE / "train.jsonl", tok, tmp_path, document_masking=True)
    data = Recorder(pickle.loads(pickle.dumps(data)))  # as a DataLoader worker gets it: no tokens copied
    collate = lambda samples: pad_collate(samples, tok.pad_token_id)  # noqa: E731

    def take(stream, n):
        return [next(stream)["input_ids"] for _ in range(n)]
    whole = take(BatchStream(data, 4, collate, seed=0), 12)
    first = BatchStream(data, 4, collate, seed=0)
    head = take(first, 7)
    resumed = BatchStream(data, 4, collate, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(torch.cat(head + take(resumed, 5)), torch.cat(whole))
    assert len(set(data.read[:48])) == 48  # the first 12 batches read distinct blocks
    ranks = [take(BatchStream(data, 2, collate, seed=0, dp_rank=r, dp_size=2), 6) for r in range(2)]
    for step in range(6):
        assert sorted(map(tuple, torch.cat([ranks[0][step], ranks[1][step]]).tolist())) == \
            sorted(map(tuple, whole[step].tolist()))
