"""PEFT: LoRA (training, export to Hugging Face peft, merge), prefix/prompt/IA3 through peft, config checks."""
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from collie.config import CollieConfig
from collie.errors import CheckpointError, ConfigError
from collie.models import ModelArgs, build_model, from_pretrained, save_pretrained
from collie.optim import build_optimizer, list_optimizers
from collie.peft import (apply_hf_peft, apply_lora, apply_peft, count_parameters, load_adapter, lora_initial_state,
                         lora_parameters, merge_adapter, merge_lora, save_adapter, trainable_parameters,
                         validate_peft_config)
from collie.peft.export import ADAPTER_WEIGHTS
from tolerance import assert_logits_close

ARGS = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
BASE_CONFIG = {"data": {"train_files": ["data/quickstart/train.jsonl"]}}


def base_model(seed: int = 0):
    return build_model(ARGS, device="cpu", seed=seed)


def lora_model(targets=("q_proj", "v_proj"), trained: bool = True, **kwargs):
    """A model with LoRA; ``trained``: B filled with random values, as after training (B=0 at init)."""
    model = base_model()
    apply_lora(model, r=4, alpha=8.0, target_modules=list(targets), seed=1, **kwargs)
    if trained:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in lora_parameters(model).items():
                if name.endswith("lora_B.weight"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def loss_of(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())


# --- LoRA ------------------------------------------------------------------------------------------------

def test_lora_keeps_base_names_and_freezes_everything_else():
    base_names = set(base_model().state_dict())
    model = lora_model(ALL_LINEARS, trained=False)
    names = set(model.state_dict())
    assert base_names < names
    assert names - base_names == set(lora_parameters(model))
    assert len(lora_parameters(model)) == 2 * (7 * ARGS.num_hidden_layers + 1)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model))
    assert [id(p) for p in trainable_parameters(model)] == [id(p) for p in lora_parameters(model).values()]
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in lora_parameters(model).values())
    assert n_total == ARGS.num_params() + n_trainable


def test_lora_at_init_leaves_logits_unchanged_and_init_is_reproducible():
    reference = base_model()(IDS)
    model = lora_model(ALL_LINEARS, trained=False)
    torch.testing.assert_close(model(IDS), reference, rtol=0, atol=0)
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in state.items() if "lora_A" in k)
    again = lora_model(ALL_LINEARS, trained=False)
    for key, value in state.items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    bound = 1 / ARGS.hidden_size ** 0.5  # kaiming-uniform(a=√5) on (r, in): U(-1/√in, 1/√in), as in peft
    assert state["model.layers.0.self_attn.q_proj.lora_A.weight"].abs().max() <= bound


def test_lora_on_meta_model_gets_the_same_values_from_its_initial_state():
    with torch.device("meta"):
        model = type(base_model())(ARGS)
    apply_lora(model, r=4, alpha=8.0, target_modules=ALL_LINEARS, seed=1)
    materialized = lora_model(ALL_LINEARS, trained=False).state_dict()
    for name, value in lora_initial_state(model, seed=1).items():
        torch.testing.assert_close(value, materialized[name], rtol=0, atol=0)


def test_only_adapters_get_gradients_and_change_under_adamw():
    model = lora_model(ALL_LINEARS, trained=False, dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        loss_of(model(IDS)).backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(lora_parameters(model))


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registered_optimizer_trains_only_the_adapters(name):
    """The trainable-parameter filter is all an optimizer needs (fused ones hook only the params they get)."""
    model = lora_model(trained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = CollieConfig.from_dict(BASE_CONFIG, [f"optim.name={name}", "optim.lr=1e-2"])
    optimizer = build_optimizer(cfg, trainable_parameters(model))
    for _ in range(2):
        loss = loss_of(model(IDS))
        if getattr(optimizer, "fused_backward", False):
            optimizer.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(lora_parameters(model))


def test_apply_peft_reads_the_config_section():
    cfg = CollieConfig.from_dict(BASE_CONFIG, ["peft.method=lora", "peft.r=2", "peft.target_modules=[up_proj]"])
    model = apply_peft(base_model(), cfg.peft, seed=3)
    assert model.lora_spec.r == 2 and model.lora_spec.scale == 8.0
    assert sorted(lora_parameters(model)) == [f"model.layers.{i}.mlp.up_proj.lora_{f}.weight"
                                              for i in range(2) for f in "AB"]


def test_unknown_target_module_names_the_model_linears():
    with pytest.raises(ConfigError, match="matches no linear of this model; its linears are down_proj, gate_proj"):
        apply_lora(base_model(), target_modules=["q_proj", "qkv_proj"])


# --- export and merge --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_pretrained(base_model(), path)
    return path


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path, base_dir):
    model = lora_model(ALL_LINEARS)
    save_adapter(model, tmp_path, base_model_dir=base_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(ALL_LINEARS)
    assert config["base_model_name_or_path"] == str(base_dir)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert_logits_close(hf(input_ids=IDS).logits, model(IDS), ARGS)


def test_adapter_keys_follow_the_architecture_names(tmp_path):
    """InternLM2 checkpoints call o_proj attention.wo and pack q/k/v into wqkv (no peft equivalent)."""
    model = build_model(ModelArgs(**{**ARGS.__dict__, "architecture": "internlm2"}), device="cpu", seed=0)
    apply_lora(model, r=2, target_modules=["o_proj", "q_proj"])
    with pytest.raises(CheckpointError, match="q_proj is packed with other weights"):
        save_adapter(model, tmp_path)
    merge_lora(model)
    apply_lora(model, r=2, target_modules=["o_proj"])
    save_adapter(model, tmp_path)
    assert "base_model.model.model.layers.0.attention.wo.lora_A.weight" in load_file(tmp_path / ADAPTER_WEIGHTS)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["wo"]
    restored = build_model(model.args, device="cpu", seed=0)
    load_adapter(restored, tmp_path)
    assert sorted(restored.lora_spec.target_modules) == ["o_proj"]


def test_packed_targets_are_refused_before_training_and_the_others_load_in_peft(tmp_path):
    """Phi-3 checkpoints fuse q/k/v and gate/up: a run's adapter on them could not be saved for peft, so
    apply_peft refuses them at the start; o_proj/down_proj adapters load in peft with the same logits."""
    args = ModelArgs(**{**ARGS.__dict__, "architecture": "phi3"})
    cfg = CollieConfig.from_dict(BASE_CONFIG, ["peft.method=lora"]).peft  # default targets: q_proj, v_proj
    with pytest.raises(ConfigError, match="q_proj, v_proj are packed with other weights in Phi3ForCausalLM "
                                          "checkpoints.*choose from o_proj, down_proj, lm_head"):
        apply_peft(build_model(args, device="cpu", seed=0), cfg)
    cfg = CollieConfig.from_dict(BASE_CONFIG, ["peft.method=lora", "peft.target_modules=[o_proj, down_proj]"]).peft
    model = apply_peft(build_model(args, device="cpu", seed=0), cfg, seed=1)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if name.endswith("lora_B.weight"):
                p.normal_(0.0, 0.05)
    build_model(args, device="cpu", seed=0).save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter", tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter")
    assert_logits_close(hf(input_ids=IDS).logits, model(IDS), ARGS)


def test_load_adapter_reads_an_adapter_written_by_peft(tmp_path, base_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj"]))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(base_dir)
    load_adapter(model, tmp_path)
    assert_logits_close(model(IDS), hf(input_ids=IDS).logits, ARGS)


def test_load_adapter_restores_the_model(tmp_path):
    model = lora_model(["v_proj", "down_proj"])
    save_adapter(model, tmp_path)
    restored = base_model()
    load_adapter(restored, tmp_path)
    torch.testing.assert_close(restored(IDS), model(IDS), rtol=0, atol=0)


def test_merge_gives_the_same_logits_and_saves_as_a_plain_model(tmp_path):
    model = lora_model(ALL_LINEARS)
    expected = model(IDS).detach()
    merge_lora(model)
    assert not lora_parameters(model) and not hasattr(model.lm_head, "lora_A")
    assert_logits_close(model(IDS), expected, ARGS)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_logits_close(hf(input_ids=IDS).logits, expected, ARGS)


def test_merge_adapter_from_directories(tmp_path, base_dir):
    model = lora_model(["q_proj", "o_proj"])
    save_adapter(model, tmp_path / "adapter", base_model_dir=base_dir)
    merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged")
    assert_logits_close(from_pretrained(tmp_path / "merged")(IDS), model(IDS), ARGS)


# --- prefix / prompt / IA3 through Hugging Face peft -----------------------------------------------------

@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3"])
def test_peft_methods_train_only_their_parameters(method):
    model = apply_hf_peft(base_model(), method, num_virtual_tokens=5, seed=0)
    mask = torch.ones_like(IDS)
    mask[0, -2:] = 0
    logits = model(IDS, position_ids=torch.arange(IDS.shape[1])[None], attention_mask=mask)
    assert logits.shape == (*IDS.shape, ARGS.vocab_size)
    loss_of(logits).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all((p.grad is not None) == p.requires_grad for p in model.parameters())
    marker = "ia3_l" if method == "ia3" else "prompt_encoder"
    assert all(marker in name for name, _ in trainable)
    assert count_parameters(model)[0] == sum(p.numel() for _, p in trainable)


def test_peft_methods_refuse_several_processes():
    cfg = CollieConfig.from_dict(BASE_CONFIG, ["peft.method=prompt"]).peft
    with pytest.raises(ConfigError, match="runs in one process .*; this job has 2 processes"):
        apply_peft(base_model(), cfg, world_size=2)


def test_ia3_starts_as_the_base_model_and_saves_a_peft_adapter(tmp_path, base_dir):
    model = apply_hf_peft(base_model(), "ia3", target_modules=["k_proj", "v_proj", "down_proj"])
    assert_logits_close(model(IDS), base_model()(IDS), ARGS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    model.save_pretrained(tmp_path, base_model_dir=base_dir)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert_logits_close(hf(input_ids=IDS).logits, model(IDS), ARGS)


# --- config checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["peft.method=lora", "peft.target_modules=[q_proj, qkv]"],
     "peft.target_modules[1]='qkv' is not a linear of a Llama-family model"),
    (["peft.method=ia3", "peft.target_modules=[wq]"], "choose from q_proj, k_proj"),
    (["peft.method=lora", "peft.target_modules=[]"], "peft.target_modules is empty"),
    (["peft.method=prefix", "parallel.tp=2"],
     "parallel.tp=2 is not supported: peft.method=prefix runs in one process (parallel.dp=1, parallel.tp=1"),
    (["peft.method=prompt", "parallel.pp=2"], "LoRA (peft.method=lora) supports every layout"),
    (["peft.method=ia3", "parallel.dp=2"], "parallel.dp=2 is not supported"),
    (["peft.method=prompt", "model.activation_checkpointing=full"], "model.activation_checkpointing=full"),
    (["peft.method=prefix", "data.pack=true"], "data.pack=true is not supported with peft.method=prefix"),
    (["peft.method=ia3", "data.pack=true", "data.document_masking=true"], "data.document_masking=true"),
])
def test_unsupported_peft_configs_raise(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_peft_config(CollieConfig.from_dict(BASE_CONFIG, overrides))
    assert message in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["peft.method=lora", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3", "parallel.sequence_parallel=true",
     "peft.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]"],
    ["peft.method=ia3", "peft.target_modules=[k_proj, v_proj, down_proj]", "data.pack=true"],
    ["peft.method=prompt", "peft.target_modules=[anything]"],  # prefix/prompt do not use target_modules
])
def test_supported_peft_configs_pass(overrides):
    validate_peft_config(CollieConfig.from_dict(BASE_CONFIG, overrides))


def test_config_load_runs_the_peft_checks():
    """Needs ``collie.config`` to call ``validate_peft_config`` among its VALIDATORS."""
    with pytest.raises(ConfigError, match="peft.method=prefix runs in one process"):
        CollieConfig.from_dict(BASE_CONFIG, ["peft.method=prefix", "parallel.tp=2"])
