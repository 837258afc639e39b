"""Generation with a KV cache (against full recomputation and transformers' generate), sampling, stop strings,
log-likelihood multiple choice, the text metrics, the eval config and `collie generate`."""
import json
import os

import pytest
import torch
import transformers

from collie.cli import main
from collie.config import CollieConfig
from collie.data.tokenizer import load_tokenizer
from collie.errors import ConfigError, DataError
from collie.evaluation import (accuracy, choice_eval, f1_macro, generate, generate_text, load_choice_records,
                               parse_choice_record)
from collie.evaluation.choice import option_loglikelihoods, option_token_ids
from collie.evaluation.evaluators import generation_metrics
from collie.evaluation.metrics import bleu, exact_match, rouge
from collie.models import ModelArgs, build_model
from collie.models.components import KVCache, build_attention_mask
from tolerance import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "quickstart", "tokenizer.model")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
ARCHS = {"llama": {}, "mistral-window": {"architecture": "mistral", "sliding_window": 6},
         "qwen2-biases": {"architecture": "qwen2", "qkv_bias": True}}
PROMPTS = [[1, 5, 9, 17, 33, 65], [1, 7], [1, 100, 3, 99]]  # different lengths: rows 1 and 2 are left-padded


def tiny_model(seed=0, **extra):
    return build_model(ModelArgs(**{**TINY, **extra}), device="cpu", seed=seed).eval()


def count_input_lengths(model):
    lengths = []
    model.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    return lengths


# --- KV cache ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 3])
def test_cached_mask_is_the_last_rows_of_the_full_mask(window):
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    full = build_attention_mask(padding, 7, window, torch.device("cpu"))
    for past in (1, 4, 6):
        cached = build_attention_mask(padding, 7 - past, window, torch.device("cpu"), past_len=past)
        assert torch.equal(cached, full[:, :, past:])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_logits_equal_full_recomputation(arch):
    model = tiny_model(**ARCHS[arch])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, positions, mask)
        cache = KVCache()
        pieces = [model(ids[:, :5], positions[:, :5], mask[:, :5], cache=cache)]
        pieces += [model(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    assert_logits_close(torch.cat(pieces, 1)[mask.bool()], full[mask.bool()], TINY, seq_len=ids.shape[1])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_greedy_generation_equals_recomputation(arch):
    model = tiny_model(**ARCHS[arch])
    lengths = count_input_lengths(model)
    cached = generate(model, PROMPTS, 12, eos_id=None, pad_id=0)
    assert lengths == [6] + [1] * 11  # the prompt once, then one token per step
    uncached = generate(model, PROMPTS, 12, eos_id=None, pad_id=0, use_cache=False)
    assert lengths[12:] == list(range(6, 18))
    assert cached == uncached
    assert all(len(row) == 12 for row in cached) and len({tuple(row) for row in cached}) == 3


def test_left_padded_rows_generate_as_they_do_alone():
    model = tiny_model()
    batched = generate(model, PROMPTS, 10, eos_id=None, pad_id=0)
    assert batched == [generate(model, [prompt], 10, eos_id=None, pad_id=0)[0] for prompt in PROMPTS]


def test_padding_to_a_multiple_recomputes_and_gives_the_same_tokens():
    """Sequence parallelism splits the sequence evenly over tp ranks: inputs are padded to a multiple of tp."""
    model = tiny_model()
    expected = generate(model, PROMPTS, 8, eos_id=None, pad_id=0)
    lengths = count_input_lengths(model)
    assert generate(model, PROMPTS, 8, eos_id=None, pad_id=0, pad_to_multiple_of=4) == expected
    assert lengths == [8, 12, 12, 12, 12, 16, 16, 16]  # every step recomputes, padded to a multiple of 4
    pairs = [(p + [4, 5, 6], len(p)) for p in PROMPTS]
    padded = option_loglikelihoods(model, pairs, 3, 0, pad_to_multiple_of=4)
    for (a, n), (b, m) in zip(padded, option_loglikelihoods(model, pairs, 3, 0)):
        assert n == m == 3 and a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
def test_greedy_generation_matches_transformers(arch, tmp_path):
    model = tiny_model(**ARCHS[arch])
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[:, width:].tolist()
    assert generate(model, PROMPTS, 10, eos_id=None, pad_id=0) == expected
    single = hf.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[0, len(PROMPTS[1]):].tolist()
    assert expected[1] == single


# --- generation options ---------------------------------------------------------------------------------------

def test_eos_ends_a_row_and_is_excluded():
    model = tiny_model()
    free = generate(model, PROMPTS, 10, eos_id=None, pad_id=0)
    eos = free[0][4]
    stopped = generate(model, PROMPTS, 10, eos_id=eos, pad_id=0)
    for row, out in zip(free, stopped):
        assert out == (row[:row.index(eos)] if eos in row else row)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy():
    model = tiny_model()

    def sample(seed, temperature=1.5, top_p=1.0):
        return generate(model, PROMPTS, 12, None, 0, temperature, top_p, torch.Generator().manual_seed(seed))
    greedy, first = generate(model, PROMPTS, 12, None, 0), sample(1)
    assert first == sample(1)
    assert first != sample(2) and first != greedy
    assert sample(3, top_p=1e-6) == greedy  # only the most likely token remains


@pytest.mark.parametrize("temperature, top_p, key", [(-0.5, 1.0, "temperature=-0.5"), (1.0, 0.0, "top_p=0.0"),
                                                     (1.0, 1.5, "top_p=1.5")])
def test_bad_sampling_options_are_refused(temperature, top_p, key):
    with pytest.raises(ConfigError, match=key):
        generate(tiny_model(), PROMPTS, 2, None, 0, temperature, top_p)


@pytest.fixture(scope="module")
def text_model():
    """A tiny model over the quickstart tokenizer's vocabulary, its tokenizer and its saved directory."""
    return tiny_model(seed=3, vocab_size=512, initializer_range=0.5), load_tokenizer(TOKENIZER)


def test_stop_string_ends_generation_and_is_cut_from_the_text(text_model):
    model, tokenizer = text_model
    prompts = ["Is 47 even or odd?", "What comes after 12?"]
    free = generate_text(model, tokenizer, prompts, max_new_tokens=20)
    stop = free[0][len(free[0]) // 2:][:3]
    assert stop.strip() and free[0].index(stop) > 0
    lengths = count_input_lengths(model)
    stopped = generate_text(model, tokenizer, prompts, max_new_tokens=20, stop=["@never@", stop])
    assert stopped[0] == free[0][:free[0].index(stop)]
    assert stopped[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    if stop not in free[1]:
        assert len(lengths) == 20  # row 1 still runs
    assert generate_text(model, tokenizer, prompts, 20, stop=["@never@"]) == free


# --- multiple choice ---------------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character (id = ord(c) - 90), BOS 1, pad 0."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text, add_bos=False):
        return [1] * add_bos + [ord(c) - 90 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 90) for i in ids if i > 2)


class UnigramModel(torch.nn.Module):
    """Context-free next-token log-probabilities: -1 for 'a', -1.5 for 'b', very unlikely otherwise."""

    def __init__(self):
        super().__init__()
        logp = torch.full((40,), -30.0)
        logp[ord("a") - 90], logp[ord("b") - 90] = -1.0, -1.5
        self.logits = torch.nn.Parameter(logp)

    def forward(self, input_ids, position_ids=None, attention_mask=None):
        return self.logits.expand(*input_ids.shape, -1)


def test_choice_scores_by_summed_and_normalised_loglikelihood():
    records = [parse_choice_record({"question": "q", "options": ["aa", "b", "c"], "answer": "b"}, 0),
               parse_choice_record({"prompt": "q", "choices": ["aaa", "ab"], "answer": 0}, 1)]
    results = choice_eval(UnigramModel(), records, CharTokenizer(), batch_size=2, f1=True)
    # sums: aa -2, b -1.5 → b; aaa -3, ab -2.5 → ab. per token: aa -1 → aa; aaa -1 → aaa
    assert results["choice_accuracy"] == 0.5 and results["choice_accuracy_norm"] == 0.5
    assert results["choice_samples"] == 2
    assert results["choice_f1_macro"] == pytest.approx(f1_macro(["b", "ab"], ["b", "aaa"]))


def test_option_loglikelihoods_do_not_depend_on_batching(text_model):
    model, tokenizer = text_model
    pairs = [option_token_ids(tokenizer, "Is 47 even or odd?", option) for option in (" even", " odd", " 4711 x")]
    assert pairs[0][0][:pairs[0][1]] == tokenizer.encode("Is 47 even or odd?", add_bos=True)
    batched = option_loglikelihoods(model, pairs, 3, tokenizer.pad_token_id)
    alone = [option_loglikelihoods(model, [pair], 1, tokenizer.pad_token_id)[0] for pair in pairs]
    for (a, n), (b, m) in zip(batched, alone):
        assert n == m and a == pytest.approx(b, abs=1e-4)
    with torch.no_grad():  # the first option by hand
        tokens, n_prompt = pairs[0]
        logp = model(torch.tensor([tokens])).log_softmax(-1)[0]
        by_hand = sum(logp[t - 1, tokens[t]].item() for t in range(n_prompt, len(tokens)))
    assert batched[0][0] == pytest.approx(by_hand, abs=1e-4) and batched[0][1] == len(tokens) - n_prompt


@pytest.mark.parametrize("record, message", [
    ({"choices": ["a", "b"], "answer": 0}, "record 3 has none of the fields 'prompt' / 'question'"),
    ({"prompt": "p", "answer": 0}, "record 3 has none of the fields 'choices' / 'options'"),
    ({"prompt": "p", "choices": ["a", "b"]}, "record 3 has no 'answer'"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "answer=2 is out of range; use 0..1"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": "c"}, "answer='c' is neither"),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "at least two non-empty strings"),
])
def test_malformed_choice_records_name_the_record_and_field(record, message):
    with pytest.raises(DataError, match=message):
        parse_choice_record(record, 3, "mc.jsonl")


def test_choice_records_load_from_jsonl_and_json(tmp_path):
    rows = [{"prompt": "p", "choices": ["x", "y"], "answer": "y"}, {"question": "q", "options": ["u", "v"], "answer": 0}]
    (tmp_path / "mc.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    (tmp_path / "mc.json").write_text(json.dumps(rows))
    for name in ("mc.jsonl", "mc.json"):
        assert [(r.prompt, r.answer) for r in load_choice_records(tmp_path / name)] == [("p", 1), ("q", 0)]
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_choice_records(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_choice_records(tmp_path / "missing.jsonl")


# --- metrics and generation evaluation ---------------------------------------------------------------------------

def test_label_metrics():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    # label a: P=1/2 R=1 F=2/3; b: P=1 R=1/2 F=2/3; c: never predicted nor true... only seen labels count
    assert f1_macro(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    assert f1_macro(["a", "c"], ["a", "b"]) == pytest.approx((1 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy([1, 2], [1])


def test_text_metrics_use_sacrebleu_and_rouge_score():
    assert exact_match([" yes ", "no"], ["yes", "yes"]) == {"exact_match": 0.5}
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100.0)
    assert bleu(["a b c d"], ["w x y z"])["bleu"] == 0.0
    scores = rouge(["the cat sat", "dogs run"], ["the cat ran", "dogs run"])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((1 / 2 + 1) / 2)


def test_generation_metrics_score_greedy_responses(text_model):
    model, tokenizer = text_model
    prompts = [tokenizer.encode(p, add_bos=True) for p in ("Is 47 even or odd?", "What comes after 12?")]
    greedy = generate(model, prompts, 6, tokenizer.eos_token_id, tokenizer.pad_token_id)
    references = [greedy[0], tokenizer.encode("0118")]  # the first sample is answered exactly
    dataset = [{"input_ids": torch.tensor(p + r + [2]), "labels": torch.tensor([-100] * len(p) + r + [2])}
               for p, r in zip(prompts, references)]
    results = generation_metrics(model, dataset, tokenizer, 2, 6, metrics=["exact_match", "bleu", "rouge"])
    assert results["exact_match"] == 0.5 and results["samples"] == 2
    assert set(results) == {"exact_match", "bleu", "rouge1", "rouge2", "rougeL", "samples"}
    assert generation_metrics(model, dataset, tokenizer, 2, 6, limit=1)["exact_match"] == 1.0


# --- config and command line ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["eval.metrics=[bleu]", "data.format=pretrain"], "bleu needs data.format=instruction"),
    (["eval.metrics=[multiple_choice]"], "multiple_choice scores the records of eval.choice_file"),
    (["eval.metrics=[rogue]"], r"eval.metrics\[0\]='rogue' is unknown \(did you mean 'rouge'"),
    (["eval.metrics=[multiple_choice, classification]", "eval.choice_file=mc.jsonl"], "list only one"),
])
def test_eval_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CollieConfig.load(QUICKSTART, overrides)


def test_eval_config_accepts_new_metrics():
    cfg = CollieConfig.load(QUICKSTART, ["eval.metrics=[perplexity, exact_match, bleu, rouge, classification]",
                                         "eval.choice_file=mc.jsonl", "eval.stop=['###']"])
    assert cfg.eval.stop == ["###"] and cfg.eval.choice_file == "mc.jsonl"


def test_collie_generate_batches_prompts_with_stop(text_model, tmp_path, capsys):
    model, tokenizer = text_model
    model.save_pretrained(tmp_path)
    prompts = ["Is 47 even or odd?", "What comes after 12?"]
    free = generate_text(model, tokenizer, prompts, max_new_tokens=8)
    stop = free[0][2:5]
    args = ["generate", str(tmp_path), "--tokenizer", TOKENIZER, "--max-new-tokens", "8", "--stop", stop]
    assert main(args + [arg for p in prompts for arg in ("--prompt", p)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(prompts[0] + free[0][:2] + "\n")
    assert prompts[1] in out
    assert main(["generate", str(tmp_path), "--tokenizer", TOKENIZER, "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p=2.0 is outside (0, 1]" in capsys.readouterr().err


def test_generation_metrics_stop_at_the_templates_end_of_turn():
    """A chat template whose turns end with a token other than EOS (Llama 3's <|eot_id|>, InternLM2's <|im_end|>):
    generation during evaluation stops there, and the reference response does not carry it."""
    tokenizer = load_tokenizer(TOKENIZER)
    answer, end_of_turn = tokenizer.encode("odd"), 7  # 7: some id that is not EOS
    prompt = tokenizer.encode("Is 47 even or odd?", add_bos=True)
    sample = {"input_ids": torch.tensor(prompt + answer + [end_of_turn]),
              "labels": torch.tensor([-100] * len(prompt) + answer + [end_of_turn])}
    script = answer + [end_of_turn] + tokenizer.encode(" and more")

    def model(ids, position_ids=None, attention_mask=None):  # emits ``script`` after the prompt, then EOS
        step = ids.shape[1] - len(prompt)
        logits = torch.zeros(ids.shape[0], ids.shape[1], tokenizer.vocab_size)
        logits[:, -1, script[step] if step < len(script) else tokenizer.eos_token_id] = 1.0
        return logits

    stopped = generation_metrics(model, [sample], tokenizer, 1, 16, device="cpu",
                                 eos_ids=[tokenizer.eos_token_id, end_of_turn])
    assert stopped["exact_match"] == 1.0
    assert generation_metrics(model, [sample], tokenizer, 1, 16, device="cpu")["exact_match"] == 0.0
