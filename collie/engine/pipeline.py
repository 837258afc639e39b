"""The engine of pipeline-parallel layouts (``parallel.pp > 1``, with or without tp and dp/ZeRO): steps,
evaluation and generation run through ``collie.distributed.pipeline.PipelineRunner``; every pipeline rank calls
the same methods with the same batch shapes."""
from __future__ import annotations

import contextlib

import torch

from collie.distributed.data_parallel import set_gradient_sync
from collie.engine.base import Engine
from collie.errors import ConfigError
from collie.loss import shift_labels


class PipelineEngine(Engine):
    """``model``: a ``ParallelModel`` whose ``runner`` is set."""

    @property
    def runner(self):
        return self.model.runner

    def forward_backward(self, batch: dict, denominator: torch.Tensor, last: bool) -> torch.Tensor:
        # The schedule runs backward itself: a loss scale (fp16) enters as a divisor of the denominator.
        set_gradient_sync(self.parts, last)
        scale = self.update.loss_scale()
        split, *pipeline_batch = self._pipeline_batch(batch)
        with split, self.autocast():
            loss = self.runner.step(*pipeline_batch, loss_denominator=denominator / scale)
        return loss / scale

    def _pipeline_batch(self, batch: dict):
        """(context, token ids, next-token targets, model inputs) of what the pipeline runs: the batch, or under
        context parallelism this rank's share of it (shifted before the split), run inside
        ``ContextParallel.attending``."""
        plan = self.context_parallel
        if plan is None:
            return (contextlib.nullcontext(), batch["input_ids"], shift_labels(batch["labels"]),
                    self.model_inputs(batch))
        shard = plan.shard(batch)
        if shard.padding is not None:  # a (row × query × key) mask would not follow the micro-batches
            raise ConfigError(f"parallel.cp={self.ctx.cp} with parallel.pp={self.ctx.pp} needs right-padded batches "
                              f"(collie's collators pad on the right); a batch with padding elsewhere needs "
                              f"parallel.pp=1 or parallel.cp=1")
        return plan.attending(shard), shard.input_ids, shard.targets, {"position_ids": shard.position_ids}

    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError("with parallel.pp > 1 no rank holds a whole forward: use loss_sum (summed "
                                  "token loss) or generation_model (last-position logits)")

    def loss_sum(self, batch: dict) -> torch.Tensor:
        split, *pipeline_batch = self._pipeline_batch(batch)
        with split, self.autocast():
            return self.ctx.cp_sum(self.runner.eval_forward(*pipeline_batch))

    def training_loss_sum(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError("pipeline stages backpropagate inside their schedule: use forward_backward")

    def generation_model(self):
        """The pipeline's last-position logits, recomputed per token (no KV cache across stages)."""
        return self.runner.last_logits, self.sequence_multiple
