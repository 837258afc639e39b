"""Exports keep what was trained: adapters that peft saved with its defaults for embedding and lm_head targets
(whole base layers and ``lora_embedding_A/B`` included) load in collie and give peft's logits. (``collie
convert`` of a LoRA checkpoint: tests/test_checkpoint.py::test_convert_of_a_lora_checkpoint_keeps_what_was_trained.)"""
import peft
import pytest
import torch
import transformers

from collie.models import ModelArgs, build_model, from_pretrained
from collie.peft import load_adapter, load_model_or_adapter

ARGS = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    build_model(ARGS, device="cpu", seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "v_proj"], ["embed_tokens"]])
def test_an_adapter_saved_by_peft_with_embedding_or_lm_head_targets_loads(tmp_path, base_dir, targets):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    hf.save_pretrained(tmp_path)  # peft's defaults: save_embedding_layers="auto" adds the whole layers
    with torch.no_grad():
        expected = hf(input_ids=IDS).logits
        model = from_pretrained(base_dir)
        load_adapter(model, tmp_path)
        torch.testing.assert_close(model(IDS), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model_or_adapter(tmp_path)(IDS), expected, rtol=1e-5, atol=1e-5)
        assert (from_pretrained(base_dir)(IDS) - expected).abs().max() > 1e-3  # the adapter matters
