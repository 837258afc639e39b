"""The collie decoder against transformers (fp32, 1e-5) for every family, and the model's own contracts:
meta-device build, init, tying, pipeline-friendly pieces, registry and model cards."""
import glob
import math
import os

import pytest
import torch
import transformers

import collie.models as cm
from collie.errors import CheckpointError, ConfigError
from collie.models import LlamaForCausalLM, ModelArgs, build_model, get_model_class, load_card, register_model
from collie.models.components import RotaryEmbedding
from hf_reference import perturb_constants
from tolerance import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {  # name: (transformers class, config class, extra config)
    "llama-gqa": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 2}),
    "llama-llama3-rope": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 2, "rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": ("LlamaForCausalLM", "LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-biases": ("LlamaForCausalLM", "LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("MistralForCausalLM", "MistralConfig", {"num_key_value_heads": 2, "sliding_window": 7}),
    "qwen2-tied": ("Qwen2ForCausalLM", "Qwen2Config", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    # QK-norm, and a head_dim that is not hidden_size / num_attention_heads
    "qwen3-head-dim": ("Qwen3ForCausalLM", "Qwen3Config", {"num_key_value_heads": 2, "head_dim": 24}),
    "qwen3-window-biases": ("Qwen3ForCausalLM", "Qwen3Config", {
        "num_key_value_heads": 4, "head_dim": 16, "use_sliding_window": True, "sliding_window": 7,
        "max_window_layers": 0, "attention_bias": True}),
    # fused qkv_proj and gate_up_proj in the checkpoint
    "phi3-window": ("Phi3ForCausalLM", "Phi3Config", {"num_key_value_heads": 2, "sliding_window": 7,
                                                      "eos_token_id": 2, "pad_token_id": 0}),
    # longrope: short factors up to original_max_position_embeddings=16, long ones for the whole batch beyond
    # (SEQ_LENS tests both), attention scaled by sqrt(1 + ln(64/16) / ln 16)
    "phi3-longrope": ("Phi3ForCausalLM", "Phi3Config", {
        "num_key_value_heads": 2, "original_max_position_embeddings": 16, "eos_token_id": 2, "pad_token_id": 0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0 + 0.5 * i for i in range(8)]}}),
    # sandwich norms with 1 + weight gains, GeGLU, scaled embeddings, alternating sliding/full layers, its own
    # attention scale; caps small enough to bend these logits and scores (transformers' eager attention applies
    # the cap, its sdpa path ignores it)
    "gemma2-softcap": ("Gemma2ForCausalLM", "Gemma2Config", {
        "num_key_value_heads": 2, "head_dim": 24, "sliding_window": 7, "query_pre_attn_scalar": 20,
        "attn_logit_softcapping": 0.3, "final_logit_softcapping": 0.5, "attn_implementation": "eager"}),
    # QK-norm with 1 + weight gains; sliding layers with their own rotary base, full ones with a scaled rope
    "gemma3-local-rope": ("Gemma3ForCausalLM", "Gemma3TextConfig", {
        "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 12,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}}),
    "gemma2-sdpa": ("Gemma2ForCausalLM", "Gemma2Config", {
        "num_key_value_heads": 1, "sliding_window": 5, "query_pre_attn_scalar": 10,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": False}),
}
SEQ_LENS = (12, 20)  # below and above phi3-longrope's original_max_position_embeddings


def hf_model(family: str):
    model_name, config_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    extra = dict(extra)
    implementation = extra.pop("attn_implementation", None)
    config = getattr(transformers, config_name)(**TINY, **extra)
    if implementation:
        config._attn_implementation = implementation
    return perturb_constants(getattr(transformers, model_name)(config).eval())


def left_padded_batch(seq_len=20):
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, seq_len))
    mask = torch.ones_like(ids)
    mask[0, :6], mask[2, :1] = 0, 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, the same weights loaded by collie) for one family."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, cm.from_pretrained(path).eval()


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, model = pair
    for seq_len in SEQ_LENS:
        ids, _, _ = left_padded_batch(seq_len)
        assert_logits_close(model(ids), hf(ids).logits, TINY, seq_len=seq_len)


@torch.no_grad()
def test_left_padded_batch_matches_transformers_on_tokens(pair):
    hf, model = pair
    ids, mask, positions = left_padded_batch()
    ours = model(ids, position_ids=positions, attention_mask=mask)
    theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_logits_close(ours[real], theirs[real], TINY, seq_len=ids.shape[1])
    assert ours.isfinite().all()


@torch.no_grad()
def test_right_padding_takes_causal_path_with_same_token_outputs(pair):
    _, model = pair
    ids, _, _ = left_padded_batch()
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    torch.testing.assert_close(model(ids, attention_mask=mask)[mask.bool()], model(ids)[mask.bool()])


def test_parameter_names_are_hugging_face_names(pair):
    """Through the family's mapping, which is the identity but for Phi-3's fused projections."""
    hf, model = pair
    assert set(type(model).hf_state_dict(model.state_dict(), model.args)) == set(hf.state_dict())
    if not isinstance(model, cm.Phi3ForCausalLM):
        assert set(model.state_dict()) == set(hf.state_dict())
    assert not any("rotary" in name for name in model.state_dict())


@torch.no_grad()
def test_saved_directory_reloads_in_transformers(pair, tmp_path):
    hf, model = pair
    model.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation=hf.config._attn_implementation).eval()
    assert type(reloaded) is type(hf)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    for seq_len in SEQ_LENS:
        ids, _, _ = left_padded_batch(seq_len)
        assert_logits_close(reloaded(ids).logits, model(ids), TINY, seq_len=seq_len)


def tiny_args(**overrides):
    return ModelArgs(**{**TINY, "num_key_value_heads": 2, **overrides})


def test_meta_build_then_init_gives_finite_logits_and_no_meta_tensors():
    model = build_model(tiny_args(), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model(torch.randint(0, 128, (2, 9))).isfinite().all()
    assert torch.equal(model.model.layers["0"].input_layernorm.weight, torch.ones(64))
    assert model.model.layers["1"].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_init_is_per_parameter_so_a_pipeline_stage_matches_the_whole_model():
    whole = build_model(tiny_args(), device="cpu", seed=3)
    with torch.device("meta"):
        stage = LlamaForCausalLM(tiny_args())
    del stage.model.layers["0"]
    stage.model.embed_tokens = None
    stage.to_empty(device="cpu")
    stage.init_weights(seed=3)
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, whole.state_dict()[name]), name
    assert not torch.equal(build_model(tiny_args(), "cpu", seed=4).lm_head.weight, whole.lm_head.weight)


@torch.no_grad()
def test_pipeline_pieces_pass_hidden_states():
    model = build_model(tiny_args(), "cpu", seed=0)
    ids = torch.randint(0, 128, (2, 9))
    full = model(ids)
    embed, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
    model.model.norm, model.lm_head = None, None  # a stage without the end returns hidden states
    hidden = model(ids)
    assert hidden.shape == (2, 9, 64)
    torch.testing.assert_close(head(norm(hidden)), full)
    model.model.embed_tokens, model.model.norm, model.lm_head = None, norm, head  # one without the start
    torch.testing.assert_close(model(embed(ids)), full)


def test_tied_embeddings_survive_to_empty_and_casts():
    model = build_model(tiny_args(tie_word_embeddings=True), "cpu", seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()
    model.to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_rope_stays_fp32_when_model_is_cast():
    model = build_model(tiny_args(rope_scaling=LLAMA3_ROPE), "cpu", seed=0)
    before = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, before)
    assert model(torch.randint(0, 128, (1, 5))).dtype == torch.bfloat16


@pytest.mark.parametrize("extra", [{"qkv_bias": True, "o_bias": True, "mlp_bias": True},
                                   {"architecture": "qwen3", "qk_norm": True, "head_dim": 24}])
def test_num_params_counts_biases_qk_norms_and_untied_head(extra):
    model = build_model(tiny_args(**extra), "cpu", seed=0)
    assert sum(p.numel() for p in model.parameters()) == model.args.num_params()


def test_families_refuse_what_their_checkpoints_cannot_hold(tmp_path):
    with pytest.raises(ConfigError, match="LlamaForCausalLM checkpoints have no q_norm/k_norm.*use architecture qwen3"):
        build_model(tiny_args(qk_norm=True), "cpu", seed=0).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="qwen3 normalizes queries and keys: set qk_norm: true"):
        build_model(tiny_args(architecture="qwen3"))
    config = {**cm.Phi3ForCausalLM.hf_config(tiny_args(architecture="phi3")),
              "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}}
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.75"):
        cm.Phi3ForCausalLM.args_from_hf(config)


def test_phi3_fused_projection_of_the_wrong_size_names_the_tensor(tmp_path):
    model = build_model(tiny_args(architecture="phi3"), "cpu", seed=0)
    model.save_pretrained(tmp_path / "phi3")
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_proj.weight: checkpoint has "
                                                      r"\(128, 64\) \(model.layers.0.self_attn.qkv_proj.weight in"):
        cm.from_pretrained(tmp_path / "phi3", args_overrides={"num_key_value_heads": 1})


def test_model_args_validation():
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        tiny_args(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="not divisible"):
        tiny_args(hidden_size=66)
    with pytest.raises(ConfigError, match="rope_type='ntk'"):
        tiny_args(rope_scaling={"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ConfigError, match="lacks low_freq_factor"):
        tiny_args(rope_scaling={"type": "llama3", "factor": 8.0})
    assert tiny_args(rope_scaling={"type": "linear", "factor": 2.0}).rope_scaling == {"rope_type": "linear",
                                                                                         "factor": 2.0}
    assert tiny_args(rope_scaling={"rope_type": "default"}).rope_scaling is None
    with pytest.raises(ConfigError, match="short_factor has 2 entries; .* head_dim / 2 = 8"):
        tiny_args(rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.0], "long_factor": [1.0] * 8,
                                "original_max_position_embeddings": 16})


def test_registry_lookup_errors_and_plugins():
    assert get_model_class("qwen2") is cm.Qwen2ForCausalLM
    with pytest.raises(ConfigError, match="did you mean 'llama'"):
        get_model_class("lama")

    @register_model("test-llama-plugin")
    class PluginLlama(LlamaForCausalLM):
        hf_architecture, hf_model_type = "PluginForCausalLM", "plugin"

    model = build_model(tiny_args(architecture="test-llama-plugin"), "cpu", seed=0)
    assert isinstance(model, PluginLlama)
    assert cm.model_class_for_hf({"architectures": ["PluginForCausalLM"]}) is PluginLlama
    assert cm.model_class_for_hf({"model_type": "mistral"}) is cm.MistralForCausalLM


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "models", "*.yaml"))))
def test_every_model_card_loads(path):
    name = os.path.basename(path)[:-len(".yaml")]
    args = load_card(name)
    assert args == load_card(path)
    assert name in cm.list_cards()
    get_model_class(args.architecture)
    with open(path) as f:
        assert f.readline().startswith("# ")


def test_card_shapes_and_errors(tmp_path):
    assert load_card("llama2-7b").num_params() == 6_738_415_616
    assert load_card("gemma2-2b").num_params() == 2_614_341_888  # the published count, sandwich norms included
    assert load_card("llama3.1-8b").rope_scaling["rope_type"] == "llama3"
    assert load_card("phi3-medium-4k").num_params() == 13_960_238_080
    with pytest.raises(ConfigError, match="unknown model card 'llama3-8'.*did you mean"):
        load_card("llama3-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_sise: 12\n")
    with pytest.raises(ConfigError, match="hidden_sise.*did you mean 'hidden_size'"):
        load_card(str(bad))


@pytest.mark.parametrize("card", ["phi3-mini-128k", "phi3.5-mini", "phi3-medium-128k"])
def test_longrope_cards_give_transformers_the_same_rope(card):
    """The config.json collie writes for a longrope card: transformers' Phi-3 rotary embedding takes the short
    factors up to position 4095 and the long ones from 4096, with the same cos/sin as collie's."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    args = load_card(card)
    theirs = Phi3RotaryEmbedding(transformers.Phi3Config(**cm.Phi3ForCausalLM.hf_config(args)))
    ours = RotaryEmbedding(args)
    assert ours.attention_scaling == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    for last in (4095, 4096):
        positions = torch.tensor([[0, 1000, last]])
        cos, sin = theirs(torch.ones(1, dtype=torch.float32), positions)
        torch.testing.assert_close(ours(positions, torch.float32), (cos, sin), rtol=0, atol=0)
