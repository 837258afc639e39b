"""The chat template used in training is saved with the model; ``collie generate`` applies it (``--raw`` does not)
and warns when a prompt gets no text; ``collie chat`` keeps the history and streams answers (stdin piped in)."""
import json
import os
import subprocess
import sys

import pytest

from collie.cli import main
from collie.data.templates import TEMPLATES, load_chat_template
from collie.data.tokenizer import load_tokenizer
from collie.evaluation.chat import chat_session
from collie.evaluation.generation import generate_reply, generate_text
from collie.peft import load_model_or_adapter
from collie.trainer import Trainer
from test_tokenizer import save_hf_tokenizer
from test_trainer import ROOT, config

QUESTIONS = ["What comes after 41?", "And after 7?"]
ANSWER_TOKENS = 6


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """final/ of a one-step run on a Hugging Face tokenizer with data.template=qwen2."""
    tmp = tmp_path_factory.mktemp("chat")
    source = save_hf_tokenizer(tmp / "tokenizer", chat_template=None)
    Trainer(config(tmp / "run", "train.max_steps=1", "checkpoint.save_final=true", "eval.before_training=false",
                   "eval.metrics=[perplexity]", f"data.tokenizer={source}", "data.template=qwen2")).fit()
    return tmp / "run" / "final"


@pytest.fixture(scope="module")
def loaded(final):
    tokenizer = load_tokenizer(final)
    return load_model_or_adapter(str(final)).eval(), tokenizer, load_chat_template(final, tokenizer)


def test_final_directory_holds_the_template_and_generation_config(final):
    from transformers import AutoTokenizer, GenerationConfig
    qwen2 = TEMPLATES["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == qwen2.chat_template  # what transformers applies is what training used
    assert json.loads((final / "collie_template.json").read_text())["template"] == "qwen2"
    generation = GenerationConfig.from_pretrained(final)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (generation.bos_token_id, generation.pad_token_id) == (tokenizer.bos_token_id, tokenizer.pad_token_id)


def test_generate_applies_the_saved_template_and_warns_on_empty_output(final, loaded, capsys):
    model, tokenizer, template = loaded
    assert template is TEMPLATES["qwen2"]
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": QUESTIONS[0]}], template, ANSWER_TOKENS)
    raw = generate_text(model, tokenizer, QUESTIONS[:1], ANSWER_TOKENS)[0]
    assert reply.strip() and reply != raw
    args = ["generate", str(final), "--prompt", QUESTIONS[0], "--max-new-tokens", str(ANSWER_TOKENS)]
    assert main(args) == 0
    assert capsys.readouterr().out == f"{QUESTIONS[0]}\n{reply}\n\n"
    assert main(args + ["--raw"]) == 0
    assert capsys.readouterr().out == f"{QUESTIONS[0]}{raw}\n"
    assert main(args + ["--stop", reply.strip()[0]]) == 0  # the answer is cut to nothing
    captured = capsys.readouterr()
    assert "prompt 1 generated nothing" in captured.err and "qwen2" in captured.err


def test_chat_streams_and_keeps_the_history(loaded):
    model, tokenizer, template = loaded
    lines, pieces, warnings = iter([QUESTIONS[0] + "\n", "\n", QUESTIONS[1] + "\n", "/exit\n", "never read\n"]), [], []
    messages = chat_session(model, tokenizer, template, lambda: next(lines), pieces.append, warnings.append,
                            max_new_tokens=ANSWER_TOKENS)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first = generate_reply(model, tokenizer, messages[:1], template, ANSWER_TOKENS)
    second = generate_reply(model, tokenizer, messages[:3], template, ANSWER_TOKENS)  # sees the first exchange
    assert [messages[1]["content"], messages[3]["content"]] == [first, second]
    assert "".join(pieces) == f"{first}\n{second}\n"
    assert len(pieces) > 4  # streamed token by token, not one piece per answer
    assert next(lines) == "never read\n" and not warnings


def test_collie_chat_on_piped_stdin(final, loaded):
    model, tokenizer, template = loaded
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "collie", "chat", str(final), "--max-new-tokens",
                             str(ANSWER_TOKENS), "--system", "Be brief."],
                            input="\n".join(QUESTIONS) + "\n", capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    history = [{"role": "system", "content": "Be brief."}]
    expected = ""
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        history.append({"role": "assistant", "content": generate_reply(model, tokenizer, history, template,
                                                                       ANSWER_TOKENS)})
        expected += history[-1]["content"] + "\n"
    assert result.stdout == expected
    assert "> " not in result.stderr  # no prompt when stdin is not a terminal


def test_chat_without_a_template_names_the_option(final, loaded, tmp_path, capsys):
    model, tokenizer = loaded[0], load_tokenizer(final)
    model.save_pretrained(tmp_path)
    tokenizer.hf.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    assert main(["chat", str(tmp_path)]) == 2
    assert "--template" in capsys.readouterr().err


def test_a_sentencepiece_run_saves_its_template_for_generate(tmp_path, capsys):
    """The quick start's kind of run (sentencepiece, data.template=alpaca): final/ names alpaca, and collie generate
    prompts with the alpaca encoding of a user turn."""
    Trainer(config(tmp_path / "run", "train.max_steps=1", "checkpoint.save_final=true", "eval.before_training=false",
                   "eval.metrics=[perplexity]")).fit()
    final = tmp_path / "run" / "final"
    tokenizer = load_tokenizer(final)
    assert load_chat_template(final, tokenizer) is TEMPLATES["alpaca"]
    assert (final / "chat_template.jinja").read_text() == TEMPLATES["alpaca"].chat_template
    model = load_model_or_adapter(str(final)).eval()
    reply = generate_text(model, tokenizer, QUESTIONS[:1], 4, template=TEMPLATES["alpaca"])[0]
    capsys.readouterr()  # the run's log
    assert main(["generate", str(final), "--prompt", QUESTIONS[0], "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == f"{QUESTIONS[0]}\n{reply}\n\n"


def test_a_pretrained_model_continues_text_even_if_its_tokenizer_has_a_template(final, tmp_path):
    from types import SimpleNamespace

    from collie.data.templates import save_chat_files
    tokenizer = load_tokenizer(final)
    assert tokenizer.chat_template  # the tokenizer files carry one
    save_chat_files(tmp_path, SimpleNamespace(format="pretrain", template="alpaca"), tokenizer)
    assert load_chat_template(tmp_path, tokenizer) is None
    assert not (tmp_path / "chat_template.jinja").exists() and (tmp_path / "generation_config.json").exists()
