"""Every model directory collie writes is complete: `collie convert` of a checkpoint and `collie convert --merge`
carry the run's tokenizer, chat template and generation config, so that transformers' AutoTokenizer and
`collie generate` (which applies the template) work on them without naming a tokenizer."""
import os

from transformers import AutoTokenizer, GenerationConfig

from collie.cli import main
from collie.trainer import Trainer
from test_tokenizer import save_hf_tokenizer
from test_trainer import config

TEXT = "Question 3: what comes after 111?"


def exported_files_work(directory, tokenizer_source) -> None:
    assert os.path.isfile(os.path.join(directory, "chat_template.jinja"))
    assert GenerationConfig.from_pretrained(directory).eos_token_id is not None
    if tokenizer_source is not None:
        assert AutoTokenizer.from_pretrained(directory).encode(TEXT) == \
            AutoTokenizer.from_pretrained(tokenizer_source).encode(TEXT)
    assert main(["generate", str(directory), "--prompt", TEXT, "--max-new-tokens", "2"]) == 0


def test_convert_of_a_checkpoint_writes_the_tokenizer_and_template(tmp_path):
    source = save_hf_tokenizer(tmp_path / "tokenizer")
    Trainer(config(tmp_path / "run", "train.max_steps=1", "checkpoint.every_steps=1", "eval.before_training=false",
                   f"data.tokenizer={source}")).fit()
    assert main(["convert", str(tmp_path / "run" / "checkpoints" / "step-00000001"), str(tmp_path / "hf")]) == 0
    exported_files_work(tmp_path / "hf", source)


def test_convert_merge_of_a_lora_adapter_writes_the_tokenizer_and_template(tmp_path):
    """A LoRA run on the shipped sentencepiece tokenizer: final/ is an adapter with its base; the merged model
    gets the adapter's tokenizer and chat files."""
    Trainer(config(tmp_path / "run", "train.max_steps=1", "checkpoint.save_final=true", "peft.method=lora",
                   "eval.before_training=false")).fit()
    final = tmp_path / "run" / "final"
    assert main(["convert", str(final / "base_model"), str(tmp_path / "merged"), "--merge", str(final)]) == 0
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.model")
    exported_files_work(tmp_path / "merged", None)
