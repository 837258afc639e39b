"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE) against transformers in fp32: logits both ways
(collie loads what transformers saves and the reverse), the training loss with the router auxiliary loss through
the engine's step, dropless routing, the expert-load metrics, LoRA on attention and (peft.lora_experts) on the
routed experts, cards and layout rules."""
import json
import os

import pytest
import torch
import transformers

import collie.models as cm
from collie.config import CollieConfig
from collie.distributed import validate_model_for_layout
from collie.errors import ConfigError
from collie.estimate.shapes import model_tensors
from collie.models import ModelArgs, build_model, load_card
from collie.models.hf_io import checkpoint_index
from collie.models.moe import SparseMoE, load_balancing_loss
from collie.trainer import Trainer
from tolerance import assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {  # name: (transformers class, config class, extra config)
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                        "router_aux_loss_coef": 0.02}),
    # renormalised top-k and a head_dim of its own
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "head_dim": 24, "router_aux_loss_coef": 0.05}),
    # top-3 of 5 without renormalisation, and the gated shared expert
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {
        "num_experts": 5, "num_experts_per_tok": 3, "moe_intermediate_size": 32, "norm_topk_prob": False,
        "shared_expert_intermediate_size": 48, "router_aux_loss_coef": 0.05}),
}


def hf_model(family: str):
    model_name, config_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**TINY, **extra)).eval()
    with torch.no_grad():  # a decisive router (transformers' init leaves it near uniform), biases and norms that matter
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 0.5)
            elif name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(seq_len=20):
    torch.manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (3, seq_len))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0  # right padding: excluded from the token loss and from the router statistics
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, its directory, the same weights loaded by collie) for one family."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path, cm.from_pretrained(path).eval()


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, _, model = pair
    ids, _, _ = batch()
    assert isinstance(model.model.layers["0"].mlp, SparseMoE)
    assert_logits_close(model(ids), hf(ids).logits, TINY)


def test_parameter_names_map_to_hugging_face_names(pair):
    """The names transformers writes (one linear per expert; in memory it fuses them into 3-D tensors)."""
    _, path, model = pair
    assert set(type(model).hf_state_dict(model.state_dict(), model.args)) == set(checkpoint_index(path))


@torch.no_grad()
def test_saved_directory_reloads_in_transformers(pair, tmp_path):
    hf, path, model = pair
    model.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids, _, _ = batch()
    assert_logits_close(reloaded(ids).logits, model(ids), TINY)
    assert set(checkpoint_index(tmp_path / "out")) == set(checkpoint_index(path))
    again = cm.load_hf_config(tmp_path / "out")
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size_", "shared_expert_intermediate_size",
                "norm_topk_prob", "router_aux_loss_coef", "architecture"):
        assert getattr(again, key) == getattr(model.args, key), key


def trainer_on(path, tmp_path, *overrides) -> Trainer:
    cfg = CollieConfig.load(os.path.join(ROOT, "configs", "quickstart.yaml"), [
        f"model.pretrained={path}", f"train.output_dir={tmp_path}", "optim.name=adamw", "optim.lr=1e-2",
        "optim.weight_decay=0.0", "optim.clip_grad_norm=0.0", "optim.warmup_steps=0", "optim.scheduler=constant",
        "optim.args={eps: 1e-5}", "train.progress_bar=false", "monitor.sinks=[jsonl]", *overrides])
    cfg.data.tokenizer = os.path.join(ROOT, cfg.data.tokenizer)
    return Trainer(cfg)


def test_training_steps_equal_transformers_loss_with_the_auxiliary_loss(pair, tmp_path):
    """Three steps of the engine on one padded batch against transformers' ``loss`` with ``output_router_logits``
    (mean token loss + router_aux_loss_coef · load-balancing loss) and torch AdamW."""
    hf, path, _ = pair
    ids, mask, labels = batch()
    trainer = trainer_on(path, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, eps=1e-5)
    trainer.engine.train()
    for step in range(3):
        out = reference(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        assert out.aux_loss > 0
        ours = trainer.engine.train_step([{"input_ids": ids, "attention_mask": mask, "labels": labels}])
        assert float(ours.loss) == pytest.approx(float(out.loss.detach()), rel=1e-5, abs=1e-6), f"step {step + 1}"
        assert {"moe/load_max", "moe/load_min"} <= set(ours.metrics)
        assert ours.metrics["moe/load_min"] <= 1.0 <= ours.metrics["moe/load_max"]
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_auxiliary_loss_is_transformers_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    torch.manual_seed(0)
    logits = [torch.randn(12, 6) for _ in range(3)]
    mask = torch.ones(2, 6)
    mask[0, 4:] = 0
    routings = [(layer, torch.topk(layer.softmax(-1), 2).indices) for layer in logits]
    expected = load_balancing_loss_func(tuple(logits), 6, 2, mask)
    torch.testing.assert_close(load_balancing_loss(routings, 6, mask.reshape(-1)), expected)


def test_dropless_routing_sends_every_token_to_its_k_experts():
    """Every token reaches its top-k experts even when all tokens pick the same ones (no capacity limit)."""
    args = ModelArgs(**TINY, architecture="mixtral", num_experts=4, num_experts_per_tok=2)
    block = SparseMoE(args)
    torch.nn.init.normal_(block.gate.weight, std=0.02)
    for p in block.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        block.gate.weight[:2] += 5.0  # experts 0 and 1 win for every (positive) token
    x = torch.rand(2, 7, TINY["hidden_size"])
    logits, weights, chosen = block.route(x.reshape(-1, TINY["hidden_size"]))
    assert set(chosen.flatten().tolist()) == {0, 1}
    expected = sum(weights[:, j, None] * torch.stack([block.experts[int(e)](t) for t, e in
                                                      zip(x.reshape(-1, TINY["hidden_size"]), chosen[:, j])])
                   for j in range(2))
    torch.testing.assert_close(block(x).reshape(-1, TINY["hidden_size"]), expected)


def test_trainer_reports_expert_load_and_lora_targets_attention(tmp_path):
    """Default LoRA targets adapt the attention only; the saved adapter gives the trained logits in HF peft."""
    import peft
    trainer = trainer_on("", tmp_path, "model.pretrained=null", "model.card=tiny-moe", "train.max_steps=2",
                         "train.log_every=1", "eval.before_training=false", "eval.every_steps=0",
                         "peft.method=lora", "train.micro_batch_size=4")
    trainer.fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2 and all(r["moe/load_max"] >= 1.0 for r in rows)
    model = trainer.engine.model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("self_attn" in n and "lora_" in n for n in trainable)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "base_model")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "final").eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(adapted(ids).logits, model(ids), model.args)


def test_lora_on_experts_trains_leaves_the_base_and_exports_the_merged_model(tmp_path):
    """peft.lora_experts: every routed expert's targets get factors of their own; training moves only the factors
    (loss falls, base weights bit-identical) and final/ holds the merged model, whose logits are the adapted
    model's (peft cannot name per-expert factors, so no adapter is written and save_adapter says why)."""
    from collie.peft import save_adapter
    from collie.errors import CheckpointError
    trainer = trainer_on("", tmp_path, "model.pretrained=null", "model.card=tiny-moe", "train.max_steps=6",
                         "train.log_every=1", "eval.before_training=false", "eval.every_steps=0", "peft.method=lora",
                         "peft.lora_experts=true", "peft.target_modules=[q_proj, gate_proj, down_proj]",
                         "train.micro_batch_size=8", "optim.lr=2e-2", "data.shuffle=false")
    model = trainer.engine.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    experts = model.args.num_experts * model.args.num_hidden_layers
    assert len([n for n in trainable if ".experts." in n]) == experts * 2 * 2  # gate and down, A and B
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) and ".up_proj." not in n for n in trainable)
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
        elif ".experts." in name and name.endswith("lora_B.weight"):
            assert param.abs().max() > 0, name  # the experts' factors trained
    final = tmp_path / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    merged = cm.from_pretrained(final).eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_logits_close(merged(ids), model.eval()(ids), model.args)
    with pytest.raises(CheckpointError, match="peft.lora_experts=true: the routed experts' LoRA factors have no peft"):
        save_adapter(model, tmp_path / "adapter")


def test_lora_targets_leave_routed_experts_alone_unless_asked():
    from collie.peft import apply_lora
    args = ModelArgs(**{**TINY, "architecture": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24})
    adapted = apply_lora(build_model(args, device="meta"), target_modules=["q_proj", "gate_proj"])
    assert adapted and all(".experts." not in n for n in adapted)
    assert any(n.endswith("shared_expert.gate_proj") for n in adapted)  # a dense MLP: adapted by default
    adapted = apply_lora(build_model(args, device="meta"), target_modules=["up_proj"], experts=True)
    assert len([n for n in adapted if ".experts." in n]) == 4 * TINY["num_hidden_layers"]
    mixtral = ModelArgs(**{**TINY, "architecture": "mixtral", "num_experts": 4, "num_experts_per_tok": 2})
    with pytest.raises(ConfigError, match=r"\['gate_proj'\] matches no linear of this model \(the routed experts' "
                                          r"linears get adapters only with peft.lora_experts=true\)"):
        apply_lora(build_model(mixtral, device="meta"), target_modules=["q_proj", "gate_proj"])
    with pytest.raises(ConfigError, match="names none of the routed experts' linears; add some of down_proj, "
                                          "gate_proj, up_proj"):
        apply_lora(build_model(mixtral, device="meta"), target_modules=["q_proj"], experts=True)
    with pytest.raises(ConfigError, match="this model has none"):
        apply_lora(build_model(ModelArgs(**TINY), device="meta"), target_modules=["q_proj"], experts=True)
    with pytest.raises(ConfigError, match="peft.lora_experts=true gives routed experts LoRA factors: set "
                                          "peft.method=lora"):
        CollieConfig.load(os.path.join(ROOT, "configs", "quickstart.yaml"), ["peft.lora_experts=true"])


@pytest.mark.parametrize("card, expected", [("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624),
                                            ("qwen1.5-moe-a2.7b", 14_315_784_192), ("tiny-moe", None)])
def test_cards_have_the_published_sizes_and_the_model_has_them(card, expected):
    args = load_card(card)
    if expected is not None:
        assert args.num_params() == expected
    assert sum(t.numel for t in model_tensors(args)) == args.num_params()
    small = ModelArgs(**{**vars(args), "num_hidden_layers": 1, "vocab_size": 64, "hidden_size": 32, "head_dim": 8,
                         "intermediate_size": 24, "moe_intermediate_size": args.moe_intermediate_size and 16,
                         "shared_expert_intermediate_size": args.shared_expert_intermediate_size and 20,
                         "num_attention_heads": 4, "num_key_value_heads": 2})
    model = build_model(small)
    assert sum(p.numel() for p in model.parameters()) == small.num_params()


def test_layout_rules_and_family_checks():
    args = load_card("tiny-moe")
    parallel = CollieConfig.load(os.path.join(ROOT, "configs", "quickstart.yaml")).parallel
    validate_model_for_layout(args, parallel, tp=2, pp=1)  # MoE blocks run replicated over tp
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0"):
        validate_model_for_layout(args, parallel, tp=1, pp=2)
    validate_model_for_layout(ModelArgs(**{**vars(args), "router_aux_loss_coef": 0.0}), parallel, tp=1, pp=2)
    with pytest.raises(ConfigError, match="num_experts_per_tok=5 exceeds num_experts=4"):
        ModelArgs(**{**vars(args), "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="set num_experts"):
        build_model(ModelArgs(**{**vars(args), "num_experts": None}))
    with pytest.raises(ConfigError, match="shared_expert_intermediate_size"):
        build_model(ModelArgs(**{**vars(args), "architecture": "qwen2_moe"}))
