"""``build_engine``: the one place that decides which engine a configuration runs on."""
from __future__ import annotations

import torch

from collie.builders import build_model, compute_dtype
from collie.distributed import ParallelModel
from collie.engine.base import Engine
from collie.engine.pipeline import PipelineEngine
from collie.engine.updates import ClassicUpdate, FusedUpdate
from collie.optim import build_optimizer, is_fused_optimizer


def build_engine(cfg, ctx, model_args, model=None) -> Engine:
    """The engine of this rank: its model (``model``, or built from the config in its final placement), the
    optimizer over the trainable parameters, and the backend that runs them."""
    model = model if model is not None else build_model(cfg, model_args, ctx)
    # by name, so that optim.no_decay sorts each parameter into its group in every layout
    optimizer = build_optimizer(cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if isinstance(model, ParallelModel):
        model.prepare_optimizer(optimizer)  # ZeRO-1 shards the optimizer state
    if cfg.parallel.engine == "deepspeed":
        from collie.distributed.deepspeed_engine import build_deepspeed_model
        from collie.engine.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, ctx, build_deepspeed_model(model, optimizer, cfg, ctx), optimizer)
    fp16 = compute_dtype(cfg) == torch.float16
    update = (FusedUpdate if is_fused_optimizer(cfg.optim.name) else ClassicUpdate)(optimizer, cfg, ctx, fp16)
    if not isinstance(model, ParallelModel):
        return Engine(cfg, ctx, model, [model], optimizer, update)
    engine_class = PipelineEngine if model.runner is not None else Engine
    return engine_class(cfg, ctx, model, model.parts, optimizer, update, context_parallel=model.context_parallel)
