"""``model.backend: hf``: transformers causal LMs of families collie does not define (GPT-2, GPT-NeoX, OPT), written
as small random models with ``save_pretrained``, trained end to end: train, evaluate (perplexity and generation),
checkpoint, resume, export, convert; dp2 ZeRO-3 equal to one process; AdaLomo, LoRA and prompt tuning; the layouts
and models it refuses, each with a ConfigError naming what to do instead."""
from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from collie.cli import main
from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.models import list_models
from collie.trainer import Trainer
from collie_torchrun import torchrun_collie

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
STEPS, RUN_TIMEOUT_S = 4, 300
LOSS_RTOL, WEIGHT_ATOL = 3e-5, 1e-5  # as tests/distributed/test_layout_matrix.py: sums in another order
# tiny random models of families collie does not define: no dropout (the layouts must see the same numbers)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0, bos_token_id=1,
        eos_token_id=2, pad_token_id=3),
}
COMMON = [
    "model.backend=hf", f"train.max_steps={STEPS}", "train.micro_batch_size=8", "train.log_every=1",
    "train.progress_bar=false", "optim.warmup_steps=0", "optim.scheduler=constant", "optim.args={eps: 1e-5}",
    "data.shuffle=false", "eval.before_training=true", "eval.every_steps=2", "eval.max_batches=1",
    "eval.batch_size=8", "eval.max_new_tokens=4", "eval.metrics=[perplexity, exact_match]",
    "checkpoint.every_steps=2", "checkpoint.keep_last=3", "monitor.sinks=[jsonl]", "parallel.timeout_s=120",
    f"data.train_files=[{ROOT}/data/quickstart/train.jsonl]", f"data.eval_files=[{ROOT}/data/quickstart/eval.jsonl]",
    f"data.tokenizer={ROOT}/data/quickstart/tokenizer.model",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(family)``: a random model of the family, saved once per module."""
    made = {}

    def get(family: str) -> str:
        if family not in made:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(family)
            transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).save_pretrained(path)
            made[family] = str(path)
        return made[family]
    return get


def overrides(pretrained: str, out, *extra) -> list[str]:
    return [*COMMON, f"model.pretrained={pretrained}", f"train.output_dir={out}", *extra]


def train(pretrained: str, out, *extra) -> None:
    assert main(["train", QUICKSTART, *overrides(pretrained, out, *extra)]) == 0


def metrics(out) -> tuple[dict, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "loss" in r}, {r["step"]: r for r in rows if "eval/loss" in r}


def assert_same_steps(got: dict, expected: dict, steps, where: str) -> None:
    assert sorted(got) == sorted(steps), where
    for step in steps:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=LOSS_RTOL), f"{where} step {step}"
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=2e-4), f"{where} {step}"


def assert_same_weights(got: dict, expected: dict, where: str) -> None:
    assert got.keys() == expected.keys(), where
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{where} {key}: {m}")


# --- one process ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_trains_evaluates_checkpoints_resumes_and_exports(family, model_dir, tmp_path):
    """Four steps with evaluations (perplexity, exact match of generations) and checkpoints; ``final/`` is the
    family's own transformers directory with the trained weights; a resume from step 2 repeats steps 3 and 4;
    ``collie convert`` of the last checkpoint writes ``final/``'s weights."""
    pretrained = model_dir(family)
    train(pretrained, tmp_path / "run")
    steps, evals = metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4] and sorted(evals) == [0, 2, 4]
    assert steps[4]["loss"] < steps[1]["loss"]
    assert "eval/exact_match" in evals[4] and evals[4]["eval/loss"] < evals[0]["eval/loss"]
    assert steps[1]["tokens_per_s_per_gpu"] > 0 and "mfu" in steps[1]  # the monitors read the model's sizes

    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    expected_class = type(transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())).__name__
    assert config["architectures"] == [expected_class]
    trained = transformers.AutoModelForCausalLM.from_pretrained(final)
    initial = transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert changed and (final / "tokenizer.model").exists()

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    train(pretrained, tmp_path / "resumed", f"checkpoint.resume={checkpoint}", "eval.before_training=false")
    assert_same_steps(metrics(tmp_path / "resumed")[0], steps, [3, 4], f"{family} resumed")

    assert main(["convert", str(tmp_path / "run" / "checkpoints" / "step-00000004"), str(tmp_path / "conv")]) == 0
    assert_same_weights(load_file(tmp_path / "conv" / "model.safetensors"),
                        load_file(final / "model.safetensors"), f"{family} convert")


# --- data parallel / ZeRO ------------------------------------------------------------------------------------

def torchrun(args: list[str], out, ranks: int = 2) -> None:
    log = str(out) + ".log"
    code = torchrun_collie(args, ranks, log, RUN_TIMEOUT_S)
    assert code == 0, f"exited with {code}:\n{open(log).read()[-5000:]}"


@pytest.mark.distributed
@pytest.mark.parametrize("family, zero, optimizer", [("gpt2", 3, "adamw"), ("gpt_neox", 2, "adalomo")])
def test_data_parallel_zero_equals_one_process(family, zero, optimizer, model_dir, tmp_path):
    """dp2 under torchrun (gloo) with ZeRO sharding each transformers decoder layer: the one-process losses,
    gradient norms, evaluations (perplexity and exact match of generations) and exported weights. GPT-2 ties its
    head to the embedding; GPT-NeoX keeps rotary buffers that are not in its checkpoint."""
    pretrained, extra = model_dir(family), [f"optim.name={optimizer}"]
    if optimizer == "adalomo":  # GPT-NeoX's key bias has a gradient that is 0 in exact arithmetic (softmax ignores
        # a shift per query): eps[0] keeps AdaLomo from normalising its rounding noise into lr-sized updates
        extra += ["optim.lr=1e-2", "optim.args={eps: [1.0e-10, 1.0e-3]}"]
    train(pretrained, tmp_path / "single", *extra)
    args = ["train", QUICKSTART, *overrides(pretrained, tmp_path / "dp2", *extra, "train.micro_batch_size=4",
                                            "parallel.dp=2", f"parallel.zero_stage={zero}")]
    torchrun(args, tmp_path / "dp2")
    (steps, evals), (expected, expected_evals) = metrics(tmp_path / "dp2"), metrics(tmp_path / "single")
    assert_same_steps(steps, expected, range(1, STEPS + 1), f"{family} dp2 zero{zero}")
    for step, row in expected_evals.items():
        assert evals[step]["eval/loss"] == pytest.approx(row["eval/loss"], rel=LOSS_RTOL)
        assert evals[step]["eval/exact_match"] == row["eval/exact_match"]
    assert_same_weights(load_file(tmp_path / "dp2" / "final" / "model.safetensors"),
                        load_file(tmp_path / "single" / "final" / "model.safetensors"), f"{family} final/")


# --- optimizers and PEFT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["lomo", "adalomo"])
def test_fused_optimizers_train_a_transformers_model(optimizer, model_dir, tmp_path):
    train(model_dir("gpt2"), tmp_path, f"optim.name={optimizer}", "optim.lr=1e-2", "optim.args={}",
          "eval.before_training=false", "checkpoint.every_steps=0")
    steps, _ = metrics(tmp_path)
    assert steps[STEPS]["loss"] < steps[1]["loss"]


def logits_of(model, ids):
    return model(input_ids=ids).logits


def test_lora_trains_the_adapter_that_peft_loads_onto_the_transformers_model(model_dir, tmp_path):
    """OPT's q_proj/v_proj (the default targets) get collie's LoRA; only the factors train; ``final/`` is a peft
    adapter whose logits on the transformers model are the trained model's."""
    import peft
    pretrained = model_dir("opt")
    cfg = CollieConfig.load(QUICKSTART, overrides(pretrained, tmp_path, "peft.method=lora", "optim.lr=1e-2",
                                                  "eval.before_training=false", "eval.metrics=[perplexity]"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.engine.model.state_dict().items()}
    trainer.fit()
    after = trainer.engine.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed)
    final = tmp_path / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == pretrained
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(pretrained), final)
    ids = torch.randint(4, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded.eval(), ids), trainer.engine.model.eval()(ids))


def test_lora_on_a_conv1d_is_refused_naming_the_linears(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"c_attn is a Conv1D, not a torch.nn.Linear.*lm_head"):
        Trainer(CollieConfig.load(QUICKSTART, overrides(model_dir("gpt2"), tmp_path, "peft.method=lora",
                                                        "peft.target_modules=[c_attn]")))


def test_prompt_tuning_through_peft_on_a_transformers_model(model_dir, tmp_path):
    train(model_dir("gpt_neox"), tmp_path, "peft.method=prompt", "peft.num_virtual_tokens=4", "optim.lr=1e-2",
          "eval.before_training=false", "checkpoint.every_steps=0", "eval.metrics=[perplexity]")
    steps, _ = metrics(tmp_path)
    assert steps[STEPS]["loss"] < steps[1]["loss"]
    assert (tmp_path / "final" / "adapter_config.json").exists()


# --- what it refuses -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tensor_and_pipeline_parallel_are_refused_naming_the_families(layout, model_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.backend=hf") as error:
        CollieConfig.load(QUICKSTART, overrides(model_dir("gpt2"), tmp_path, layout))
    assert all(family in str(error.value) for family in list_models())


@pytest.mark.parametrize("setting, message", [
    ("model.pretrained=null", "set model.pretrained"),
    ("data.document_masking=true", "document_masking"),
    ("model.arch={hidden_size: 64}", "edit that file"),
])
def test_settings_that_need_collie_model_code_are_refused(setting, message, model_dir, tmp_path):
    with pytest.raises(ConfigError, match=message):
        CollieConfig.load(QUICKSTART, overrides(model_dir("gpt2"), tmp_path, "data.pack=true", setting))


def test_a_model_that_needs_remote_code_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"model_type": "my_custom_lm", "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    with pytest.raises(ConfigError, match="trust_remote_code=False"):
        Trainer(CollieConfig.load(QUICKSTART, overrides(str(tmp_path / "model"), tmp_path / "run")))
