"""The engine of pipeline-parallel layouts (``parallel.pp > 1``, with or without tp and dp/ZeRO): steps,
evaluation and generation run through ``collie.distributed.pipeline.PipelineRunner``; every pipeline rank calls
the same methods with the same batch shapes."""
from __future__ import annotations

import torch

from collie.distributed.data_parallel import set_gradient_sync
from collie.engine.base import Engine


class PipelineEngine(Engine):
    """``model``: a ``ParallelModel`` whose ``runner`` is set."""

    @property
    def runner(self):
        return self.model.runner

    def forward_backward(self, batch: dict, denominator: torch.Tensor, last: bool) -> torch.Tensor:
        # The schedule runs backward itself: a loss scale (fp16) enters as a divisor of the denominator.
        set_gradient_sync(self.parts, last)
        scale = self.update.loss_scale()
        with self.autocast():
            loss = self.runner.step(batch["input_ids"], batch["labels"], self.model_inputs(batch),
                                    loss_denominator=denominator / scale)
        return loss / scale

    def forward(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError("with parallel.pp > 1 no rank holds a whole forward: use loss_sum (summed "
                                  "token loss) or generation_model (last-position logits)")

    def loss_sum(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            return self.runner.eval_forward(batch["input_ids"], batch["labels"], self.model_inputs(batch))

    def training_loss_sum(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError("pipeline stages backpropagate inside their schedule: use forward_backward")

    def generation_model(self):
        """The pipeline's last-position logits, recomputed per token (no KV cache across stages)."""
        return self.runner.last_logits, self.sequence_multiple
