"""Parameter groups: no weight decay for norm gains and biases (and, by option, embeddings), chosen by parameter
name in one place (collie.optim.param_groups) and respected by every optimizer, the checkpoint's JSON settings,
and FSDP2 / DeepSpeed ZeRO-3 through the Trainer (equal to one process)."""
import json
import os

import pytest
import torch

from collie.config import CollieConfig
from collie.engine import state as named_state
from collie.errors import ConfigError
from collie.models import build_model, load_card
from collie.optim import build_optimizer, list_optimizers
from collie.optim.param_groups import param_groups, parameter_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
BASE = {"model": {"card": "tiny"}, "data": {"train_files": ["x.jsonl"]}}


def tiny_llama():
    torch.manual_seed(0)
    return build_model(load_card("tiny"), device="cpu", seed=0)


def group_names(groups) -> dict:
    return {g["name"]: g for g in groups}


def test_groups_of_the_tiny_llama_by_name():
    model = tiny_llama()
    named = dict(model.named_parameters())
    groups = group_names(param_groups(model.named_parameters(), weight_decay=0.1))
    exempt = {n for n, p in named.items() if any(p is q for q in groups["no_decay"]["params"])}
    assert exempt == {n for n in named if n.endswith("norm.weight")}  # input/post_attention layernorm, model.norm
    assert len(exempt) == 2 * 4 + 1
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert any(p is named["model.embed_tokens.weight"] for p in groups["decay"]["params"])
    assert len(groups["decay"]["params"]) + len(exempt) == len(named)

    with_embeddings = group_names(param_groups(model.named_parameters(), ["norm", "bias", "embedding"], 0.1))
    assert any(p is named["model.embed_tokens.weight"] for p in with_embeddings["no_decay"]["params"])
    everything = param_groups(model.named_parameters(), [], 0.1)
    assert [g["name"] for g in everything] == ["decay"] and len(everything[0]["params"]) == len(named)


@pytest.mark.parametrize("name, kinds", [
    ("model.layers.0.input_layernorm.weight", {"norm"}), ("model.norm.weight", {"norm"}),
    ("transformer.ln_f.bias", {"norm", "bias"}), ("model.layers.3.self_attn.q_proj.bias", {"bias"}),
    ("model.layers.3.self_attn.q_norm.weight", {"norm"}), ("model.embed_tokens.weight", {"embedding"}),
    ("transformer.wte.weight", {"embedding"}), ("lm_head.weight", set()),
    ("model.layers.0.mlp.down_proj.weight", set()), ("model.layers.1.self_attn.o_proj.lora_A.weight", set()),
    # wrapper prefixes of torch.compile, activation checkpointing and peft do not change the kind
    ("model.layers._orig_mod.0._checkpoint_wrapped_module.post_attention_layernorm.weight", {"norm"}),
    ("base_model.model.model.embed_tokens.weight", {"embedding"}),
])
def test_parameter_kinds_by_name(name, kinds):
    assert parameter_kinds(name) == kinds


def load(*overrides):
    return CollieConfig.from_dict(BASE, list(overrides))


@pytest.mark.parametrize("name", sorted(set(list_optimizers()) & {"adamw", "lion", "adan", "sophia", "lomo",
                                                                  "adalomo"}))
def test_weight_decay_reaches_only_the_decay_group(name):
    """One step with zero gradients: only weight decay moves a weight, so the decay group shrinks and the
    norm gains stay bit for bit where they were."""
    cfg = load(f"optim.name={name}", "optim.lr=0.1", "optim.weight_decay=0.5", "optim.clip_grad_norm=0")
    model = tiny_llama()
    opt = build_optimizer(cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 0.5), ("no_decay", 0.0)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # fused optimizers update from gradients set outside backward too
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):
            assert torch.equal(p, before[n]), n
        else:
            assert p.abs().sum() < before[n].abs().sum(), f"{n} was not decayed"
            if name in ("adamw", "lomo"):  # decoupled decay: θ(1 − lr·wd) exactly
                torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()


def test_no_decay_is_validated_at_config_load():
    assert load().optim.no_decay == ["norm", "bias"]
    assert load("optim.no_decay=[norm, bias, embedding]").optim.no_decay == ["norm", "bias", "embedding"]
    with pytest.raises(ConfigError, match="optim.no_decay: unknown kind 'embeddings' \\(did you mean 'embedding'"):
        load("optim.no_decay=[embeddings]")
    with pytest.raises(ConfigError, match="set it as optim.no_decay"):
        load("optim.args={no_decay: [bias]}")


def test_unnamed_parameters_make_one_group():
    opt = build_optimizer(load("optim.weight_decay=0.1"), tiny_llama().parameters())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1


def test_checkpoint_json_restores_lr_and_weight_decay_per_group():
    """The engine saves param_groups settings in JSON by index (with their names); resuming restores them."""
    cfg = load("optim.weight_decay=0.1")
    model = tiny_llama()
    opt = build_optimizer(cfg, list(model.named_parameters()))
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 3e-4, 2e-4
    opt.param_groups[1]["weight_decay"] = 0.05
    _, extras = named_state.optimizer_state([model], opt)
    extras = json.loads(json.dumps(extras))
    assert [g["name"] for g in extras["param_groups"]] == ["decay", "no_decay"]
    fresh = build_optimizer(cfg, list(model.named_parameters()))
    named_state.load_optimizer_extras([model], fresh, extras)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in fresh.param_groups] == [
        ("decay", 3e-4, 0.1), ("no_decay", 2e-4, 0.05)]
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)  # tuples stay tuples


# --- the Trainer under FSDP2 ZeRO-3 and DeepSpeed ZeRO-3 on two gloo ranks equals one process ----------------

COMMON = [
    "model.arch={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}", "train.max_steps=3",
    "train.log_every=1", "train.progress_bar=false", "checkpoint.save_final=true", "eval.before_training=false",
    "eval.every_steps=0", "eval.metrics=[perplexity]", "eval.max_batches=1", "eval.batch_size=4",
    "optim.warmup_steps=0", "optim.scheduler=constant", "optim.args={eps: 1e-5}", "optim.lr=1e-2",
    "optim.weight_decay=2.0", "monitor.sinks=[jsonl]", "data.shuffle=false", "data.seq_len=48",
    f"data.train_files=[{ROOT}/data/quickstart/train.jsonl]", f"data.eval_files=[{ROOT}/data/quickstart/eval.jsonl]",
    f"data.tokenizer={ROOT}/data/quickstart/tokenizer.model",
]


def final_weights(output_dir) -> dict:
    from collie.models import from_pretrained
    return dict(from_pretrained(os.path.join(output_dir, "final")).state_dict())


def train(output_dir, *overrides, world: int = 1):
    from collie.distributed.launch import run_distributed
    from collie.trainer import Trainer
    args = [*COMMON, f"train.output_dir={output_dir}", *overrides]
    if world == 1:
        Trainer(CollieConfig.load(QUICKSTART, [*args, "train.micro_batch_size=8"])).fit()
    else:
        run_distributed("collie", world, ["train", QUICKSTART, *args, "train.micro_batch_size=4"], timeout_s=300)
    return final_weights(output_dir)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"))


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.zero_stage=3"], ["parallel.engine=deepspeed", "parallel.zero_stage=3"]],
                         ids=["fsdp2_zero3", "deepspeed_zero3"])
def test_groups_under_zero3_equal_one_process(layout, one_process, tmp_path):
    if "parallel.engine=deepspeed" in layout:
        pytest.importorskip("deepspeed")
    sharded = train(tmp_path / "dp2", "parallel.dp=2", *layout, world=2)
    for name, weight in one_process.items():
        torch.testing.assert_close(sharded[name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.distributed
def test_the_groups_change_the_result(one_process, tmp_path):
    """Without the exemption the norm gains decay (wd 2.0, lr 1e-2: 2% per step), so the comparison above
    would fail if a sharded engine dropped the groups."""
    decayed = train(tmp_path / "all", "optim.no_decay=[]")
    name = "model.norm.weight"
    assert decayed[name].mean() < one_process[name].mean() - 0.02
