"""Hugging Face directories: InternLM2 layout, shards, .bin fallback, atomic saves and errors that name the
file or key."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import collie.models.hf_io as hf_io
from collie.errors import CheckpointError, ConfigError
from collie.models import (LlamaForCausalLM, ModelArgs, build_model, from_pretrained, iter_hf_tensors,
                           load_hf_config, load_hf_weights, save_pretrained)
from hf_reference import perturb_constants
from tolerance import assert_logits_close

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def hf_llama(**extra):
    torch.manual_seed(0)
    return perturb_constants(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **extra)).eval())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """(transformers Llama, its saved directory)."""
    model = hf_llama()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


def copy_dir(src, dst):
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# --- InternLM2: written here independently of collie's mapping -------------------------------------------

INTERNLM2_NAMES = [("model.embed_tokens", "model.tok_embeddings"), ("self_attn.o_proj", "attention.wo"),
                   ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                   ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
                   ("post_attention_layernorm", "ffn_norm"), ("lm_head", "output")]


def to_internlm2(state, heads=4, kv_heads=2, head_dim=16):
    """Llama weights in InternLM2's layout: per kv group, its query heads, then its key and value head."""
    out, per_group = {}, heads // kv_heads
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            prefix, kind = name.split(".self_attn.")[0], name.rsplit(".", 1)[1]
            q, k, v = (state[f"{prefix}.self_attn.{p}_proj.{kind}"].split(head_dim) for p in "qkv")
            rows = [t for g in range(kv_heads) for t in (*q[g * per_group:(g + 1) * per_group], k[g], v[g])]
            out[f"{prefix}.attention.wqkv.{kind}"] = torch.cat(rows)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            for old, new in INTERNLM2_NAMES:
                name = name.replace(old, new)
            out[name] = tensor
    return out


@torch.no_grad()
def test_internlm2_layout_loads_and_saves(tmp_path):
    llama = hf_llama(attention_bias=True)
    config = {**llama.config.to_dict(), "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "bias": True, "rope_theta": 10000.0, "rope_scaling": None}
    del config["rope_parameters"], config["attention_bias"]
    source = tmp_path / "internlm2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    expected = to_internlm2(llama.state_dict())
    save_file(expected, source / "model.safetensors", metadata={"format": "pt"})

    model = from_pretrained(source).eval()
    assert type(model).__name__ == "InternLM2ForCausalLM" and model.args.qkv_bias and model.args.o_bias
    assert_logits_close(model(IDS), llama(IDS).logits, TINY)

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (written["model_type"], written["architectures"], written["bias"]) == ("internlm2",
                                                                                 ["InternLM2ForCausalLM"], True)
    torch.testing.assert_close(from_pretrained(tmp_path / "saved")(IDS), model(IDS), rtol=0, atol=0)


# --- formats ----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_sharded_round_trip_with_transformers(llama_dir, tmp_path):
    hf, path = llama_dir
    model = from_pretrained(path)
    save_pretrained(model, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()

    reloaded = from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    assert_logits_close(theirs(IDS).logits, hf(IDS).logits, TINY)


def test_save_in_another_dtype(llama_dir, tmp_path):
    model = from_pretrained(llama_dir[1])
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert reloaded.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("sharded", [False, True])
@torch.no_grad()
def test_bin_fallback(llama_dir, tmp_path, sharded):
    hf, _ = llama_dir
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    if sharded:
        names = list(state)
        halves = {"pytorch_model-1.bin": names[:7], "pytorch_model-2.bin": names[7:]}
        for file, keys in halves.items():
            torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    assert_logits_close(from_pretrained(tmp_path)(IDS), hf(IDS).logits, TINY)


def test_iter_hf_tensors_reads_only_wanted_keys(llama_dir):
    wanted = ["model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
    got = dict(iter_hf_tensors(llama_dir[1], wanted))
    assert list(got) == wanted and got["model.layers.1.mlp.up_proj.weight"].shape == (96, 64)
    assert len(dict(iter_hf_tensors(llama_dir[1]))) == len(llama_dir[0].state_dict())


def test_pipeline_stage_loads_only_its_tensors(llama_dir):
    full = from_pretrained(llama_dir[1])
    with torch.device("meta"):
        stage = LlamaForCausalLM(full.args)
    del stage.model.layers["0"]
    stage.model.embed_tokens = None
    stage.to_empty(device="cpu")
    load_hf_weights(stage, llama_dir[1], strict=False)
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[name]), name
    with pytest.raises(CheckpointError, match="does not use: model.embed_tokens.weight"):
        load_hf_weights(stage, llama_dir[1])


def test_load_hf_config_reads_old_and_new_rope_formats(tmp_path):
    base = {"architectures": ["LlamaForCausalLM"], **TINY, "eos_token_id": [7, 8]}
    (tmp_path / "config.json").write_text(json.dumps(
        {**base, "rope_theta": 500000, "rope_scaling": {"type": "linear", "factor": 4}}))
    old = load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}))
    assert load_hf_config(tmp_path) == old
    assert (old.rope_theta, old.rope_scaling, old.n_kv_heads, old.eos_token_id) == (
        500000.0, {"rope_type": "linear", "factor": 4.0}, 2, 7)


def test_phi3_su_rope_is_longrope_with_the_top_level_pretraining_length(tmp_path):
    """Phi-3's first 128K configs say "su" and keep original_max_position_embeddings beside rope_scaling."""
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], **TINY,
                                                      "original_max_position_embeddings": 16,
                                                      "rope_scaling": {"type": "su", **factors}}))
    assert load_hf_config(tmp_path).rope_scaling == {"rope_type": "longrope", **factors,
                                                     "original_max_position_embeddings": 16}


def test_args_overrides_and_dtype(llama_dir):
    model = from_pretrained(llama_dir[1], dtype=torch.bfloat16, args_overrides={"rms_norm_eps": 1e-3})
    assert model.args.rms_norm_eps == 1e-3 and model.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="args_overrides.hidden_sise"):
        from_pretrained(llama_dir[1], args_overrides={"hidden_sise": 8})


# --- atomic saves -----------------------------------------------------------------------------------------

def test_save_replaces_weights_and_keeps_other_files(llama_dir, tmp_path):
    model = from_pretrained(llama_dir[1])
    target = tmp_path / "out"
    save_pretrained(model, target, max_shard_size="40KB")
    (target / "tokenizer.json").write_text("{}")
    save_pretrained(model, target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_save_leaves_existing_directory_untouched(llama_dir, tmp_path, monkeypatch):
    model = from_pretrained(llama_dir[1])
    target = copy_dir(llama_dir[1], tmp_path / "out")
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf_io, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --- errors name the file or key --------------------------------------------------------------------------

def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        from_pretrained(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: architecture 'GPT2LMHeadModel'.*supported: "
                                              r"LlamaForCausalLM \(llama\)"):
        from_pretrained(tmp_path)


def test_invalid_config_values(llama_dir, tmp_path):
    path = copy_dir(llama_dir[1], tmp_path / "m")
    edit_json(path / "config.json", num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=r"config\.json: .*num_key_value_heads=3"):
        from_pretrained(path)


def test_missing_shard(llama_dir, tmp_path):
    model = from_pretrained(llama_dir[1])
    save_pretrained(model, tmp_path / "m", max_shard_size="40KB")
    shard = sorted(set(json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
                       .values()))[1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json lists shard {shard}.* does not exist"):
        from_pretrained(tmp_path / "m")


def test_shape_mismatch_names_the_tensor(llama_dir, tmp_path):
    path = copy_dir(llama_dir[1], tmp_path / "m")
    edit_json(path / "config.json", intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight: checkpoint has "
                                              r"\((96, 64|64, 96)\), config expects \((128, 64|64, 128)\)"):
        from_pretrained(path)


def test_truncated_safetensors(llama_dir, tmp_path):
    path = copy_dir(llama_dir[1], tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors.*truncated"):
        from_pretrained(path)


def test_missing_and_unexpected_tensors(llama_dir, tmp_path):
    state = llama_dir[0].state_dict()
    path = copy_dir(llama_dir[1], tmp_path / "m")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.norm\.weight"):
        from_pretrained(path)
    save_file({**state, "model.layers.2.mlp.up_proj.weight": torch.ones(3)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.2\.mlp\.up_proj\.weight"):
        from_pretrained(path)


def test_no_weights(llama_dir, tmp_path):
    path = copy_dir(llama_dir[1], tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found; expected model\.safetensors"):
        from_pretrained(path)


def test_unexpressible_biases_refuse_to_save(tmp_path):
    model = build_model(ModelArgs(**TINY, architecture="mistral", qkv_bias=True), "cpu", seed=0)
    with pytest.raises(ConfigError, match="MistralForCausalLM checkpoints store no biases"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
