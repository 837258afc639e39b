"""Parameter-efficient fine-tuning: LoRA applied from outside the model (every parallel layout, tensor parallel
included), prefix tuning, prompt tuning and IA3 through Hugging Face peft, and adapters saved in peft's format.
docs/peft.md describes the methods, layouts and export."""
from collie.peft.adapters import PeftCausalLM, apply_hf_peft, to_transformers
from collie.peft.build import apply_peft, save_peft, save_trained, validate_peft_config
from collie.peft.export import load_adapter, load_model_or_adapter, lora_state_dict, merge_adapter, save_adapter
from collie.peft.lora import (LLAMA_LINEARS, LoraParallel, LoraSpec, apply_lora, count_parameters,
                              load_lora_initial_state, lora_initial_state, lora_parameters,
                              lora_tensor_parallel_plan, merge_lora, trainable_parameters)

__all__ = ["LLAMA_LINEARS", "LoraParallel", "LoraSpec", "PeftCausalLM", "apply_hf_peft", "apply_lora", "apply_peft",
           "count_parameters", "load_adapter", "load_model_or_adapter", "load_lora_initial_state", "lora_initial_state", "lora_parameters",
           "lora_state_dict", "lora_tensor_parallel_plan", "merge_adapter", "merge_lora", "save_adapter",
           "save_peft", "save_trained", "to_transformers", "trainable_parameters", "validate_peft_config"]
