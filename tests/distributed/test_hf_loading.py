"""A Hugging Face checkpoint (sharded safetensors written by transformers) loads straight into tp2×pp2 and
dp2×tp2 ZeRO-3 placements: each rank reads about its share of the bytes, the loss of a batch equals
transformers' (from its logits), greedy generation (through the pipeline stages at tp2×pp2) gives transformers'
tokens and the gathered weights equal the checkpoint. For Llama, Qwen3 (QK-norm over each rank's heads) and
Phi-3 (fused qkv_proj/gate_up_proj, each rank reading its rows of them)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from collie.distributed.launch import run_distributed
from collie.loss import causal_lm_loss_sum
from collie.models import load_hf_config, model_class_for_hf

import hf_load_rank

pytestmark = pytest.mark.distributed
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_load_rank.py")


FAMILIES = {"llama": {}, "qwen3": {"head_dim": 24}, "phi3": {"sliding_window": 6, "pad_token_id": 0}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_model(request, tmp_path_factory):
    import transformers
    family = request.param
    config = transformers.AutoConfig.for_model(
        family, vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **FAMILIES[family])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms are initialised to ones: make the QK-norm weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path, max_shard_size="60KB")  # several shards and an index
    assert (path / "model.safetensors.index.json").exists()
    return model, path


@pytest.fixture(scope="module")
def ranks(hf_model):
    _, path = hf_model
    return run_distributed(RANK_SCRIPT, 4, [path, *hf_load_rank.LAYOUTS], timeout_s=180)


@pytest.mark.parametrize("layout", sorted(hf_load_rank.LAYOUTS))
def test_loaded_layout_matches_transformers(layout, hf_model, ranks):
    model, path = hf_model
    ids = hf_load_rank.batch(model.config.vocab_size)
    with torch.no_grad():
        expected = causal_lm_loss_sum(model(ids).logits, ids).item()
    assert ranks[0][layout]["loss_sum"] == pytest.approx(expected, rel=1e-5)
    checkpoint = {}
    for shard in path.glob("*.safetensors"):
        checkpoint.update(load_file(shard))
    gathered = {key: torch.tensor(value) for key, value in ranks[0][layout]["weights"].items()}
    gathered = model_class_for_hf(model.config.to_dict()).hf_state_dict(gathered, load_hf_config(path))
    assert set(gathered) == set(checkpoint)
    for key, value in checkpoint.items():
        torch.testing.assert_close(gathered[key], value, rtol=0, atol=0, msg=key)
    total = sum(v.numel() * v.element_size() for v in checkpoint.values())
    for rank, result in enumerate(ranks):  # 4 ranks: each reads about a quarter (norms are read whole)
        assert result[layout]["bytes_read"] < 0.4 * total, f"rank {rank} read {result[layout]['bytes_read']}/{total}"


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("layout", sorted(hf_load_rank.LAYOUTS))
def test_generation_in_the_layout_matches_transformers(layout, hf_model, ranks):
    model, _ = hf_model
    expected = [greedy(model, p, hf_load_rank.NEW_TOKENS) for p in hf_load_rank.PROMPTS]
    for rank, result in enumerate(ranks):
        assert result[layout]["generated"] == expected, f"rank {rank}"
