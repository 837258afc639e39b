"""Llama-family models: arguments, registry, the shared decoder, Hugging Face I/O and model cards.

Importing this package registers the built-in architectures (llama, mistral, qwen2, qwen3, internlm2, phi3,
gemma2, gemma3, mixtral, qwen2_moe, qwen3_moe).
"""
from collie.models.args import ModelArgs
from collie.models.cards import list_cards, load_card
from collie.models.components import KVCache
from collie.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from collie.models.hf_io import from_pretrained, iter_hf_tensors, load_hf_config, load_hf_weights, save_pretrained
from collie.models.llama import (InternLM2ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM,
                                 Qwen2ForCausalLM, Qwen3ForCausalLM)
from collie.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from collie.models.registry import build_model, get_model_class, list_models, model_class_for_hf, register_model

__all__ = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "InternLM2ForCausalLM", "KVCache", "LlamaForCausalLM",
           "MistralForCausalLM", "MixtralForCausalLM", "ModelArgs", "Phi3ForCausalLM", "Qwen2ForCausalLM",
           "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "build_model",
           "from_pretrained", "get_model_class", "iter_hf_tensors", "list_cards", "list_models",
           "load_card", "load_hf_config", "load_hf_weights", "model_class_for_hf", "register_model",
           "save_pretrained"]
