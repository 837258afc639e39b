"""The engine of ``parallel.engine: deepspeed``: DeepSpeed's ZeRO engine reduces, clips, scales and steps, and
writes its own partitioned checkpoint files (``collie.distributed.deepspeed_engine``)."""
from __future__ import annotations

import torch

from collie.distributed.deepspeed_engine import DeepSpeedModel
from collie.engine.base import Engine
from collie.engine.updates import StepResult


class DeepSpeedUpdate:
    """Backward through DeepSpeed, whose own step updates at the accumulation boundary."""

    def __init__(self, model: DeepSpeedModel):
        self.model = model

    def begin(self, num_micro_batches: int) -> None:
        pass

    def loss_scale(self) -> float:
        return 1.0  # DeepSpeed scales fp16 losses itself

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self, loss: torch.Tensor, params) -> StepResult:
        # already stepped; DeepSpeed skips overflowing fp16 steps itself
        return StepResult(bool(torch.isfinite(loss)), float(self.model.grad_norm()))

    def state_dict(self) -> dict:
        return {}  # in DeepSpeed's own files

    def load_state_dict(self, state: dict) -> None:
        pass


class DeepSpeedEngine(Engine):
    """``model``: a ``DeepSpeedModel`` (full model on every rank, partitioned by DeepSpeed)."""

    def __init__(self, cfg, ctx, model: DeepSpeedModel, optimizer):
        super().__init__(cfg, ctx, model, model.parts, optimizer, DeepSpeedUpdate(model))

    def state_dict(self) -> dict:
        return {}  # DeepSpeed writes and reads its partitioned files itself

    def extra_state(self) -> dict:
        return {"optimizer": {}, "loss_scaler": {}}

    def prepare_load(self) -> None:
        pass

    def load_state_dict(self, tensors: dict, extra: dict) -> None:
        pass  # load_files restored everything

    def save_files(self, directory: str) -> None:
        self.model.save(directory)

    def load_files(self, directory: str) -> None:
        self.model.load(directory)

    def full_state_dict(self) -> dict:
        state = self.model.full_state_dict()  # a collective: every rank gathers
        return state if self.ctx.is_main_process else {}
