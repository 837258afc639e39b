"""Parallelism applied from outside the model: mesh, tensor/sequence parallel, pipeline, ZeRO data parallel.

``parallelize`` applies them in order (pipeline stages → tensor parallel → activation checkpointing → data
parallel → weights); docs/parallelism.md describes each layout.
"""
from collie.distributed.data_parallel import apply_data_parallel, clip_grad_norm_, shard_optimizer_state
from collie.distributed.mesh import ParallelContext, barrier, init_parallel, resolve_degrees, validate_model_for_layout
from collie.distributed.parallelize import (ParallelModel, default_init_fn, gather_full_state_dict,
                                            load_full_state_dict, parallelize, parallelize_loaded)
from collie.distributed.pipeline import PipelineRunner, split_layers
from collie.distributed.tensor_parallel import apply_tensor_parallel, full_logits, vocab_parallel_loss_sum

__all__ = ["ParallelContext", "ParallelModel", "PipelineRunner", "apply_data_parallel", "apply_tensor_parallel",
           "barrier", "clip_grad_norm_", "default_init_fn", "full_logits", "gather_full_state_dict", "init_parallel",
           "load_full_state_dict", "parallelize", "parallelize_loaded", "resolve_degrees", "shard_optimizer_state", "split_layers",
           "validate_model_for_layout", "vocab_parallel_loss_sum"]
