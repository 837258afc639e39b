"""The engine: one rank's model and optimizer behind the methods every backend offers. The Trainer, the
checkpoint code, the evaluators, ``collie bench`` and the tests drive a model only through them, so none of them
asks what kind of model it holds::

    engine = build_engine(cfg, ctx, model_args)          # collie.engine.factory
    step = engine.train_step(micro_batches)              # StepOutput(loss, tokens, StepResult(finite, grad_norm))
    engine.loss_sum(batch); engine.generation_model()    # evaluation
    engine.state_dict(); engine.export(path, args)       # checkpoints (DCP), Hugging Face directories

``Engine`` itself runs a model that is called directly: one process, or tensor and data parallel (DDP, FSDP2
ZeRO) without pipeline stages. ``PipelineEngine`` and ``DeepSpeedEngine`` override what differs; how gradients
become updates (classic ``step()`` or LOMO/AdaLomo inside backward) is the ``update`` strategy it is given.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from collie.builders import compute_dtype
from collie.data.pretrain import document_ids
from collie.distributed import barrier, full_logits, gather_full_state_dict, vocab_parallel_loss_sum
from collie.distributed.data_parallel import set_gradient_sync
from collie.distributed.tensor_parallel import vocab_parallel_token_loss_sum
from collie.engine import state as named_state
from collie.engine.updates import StepResult
from collie.loss import auxiliary_loss_sum, chunked_lm_loss_sum, count_loss_tokens
from collie.models.moe import expert_load_metrics
from collie.optim import refresh_hessian, sophia_refresh_due


@dataclass
class StepOutput:
    """One optimizer step: the global token-mean loss, the step's token counts over all dp ranks, and what the
    update did."""
    loss: torch.Tensor
    loss_tokens: int
    input_tokens: int
    result: StepResult
    metrics: dict = field(default_factory=dict)  # the model's own figures (an MoE model's expert load)


class Engine:
    """One process, or tp/dp/ZeRO without pipeline stages. ``parts``: the modules this rank holds (the model,
    or its pipeline stages); ``update``: a ``ClassicUpdate`` or ``FusedUpdate`` over ``optimizer``."""

    def __init__(self, cfg, ctx, model, parts: list, optimizer, update, context_parallel=None):
        self.cfg, self.ctx, self.model, self.parts = cfg, ctx, model, list(parts)
        self.optimizer, self.update = optimizer, update
        self.compute_dtype = compute_dtype(cfg)
        self.context_parallel = context_parallel  # parallel.cp > 1: loss forwards run on this rank's tokens

    # --- what this rank holds --------------------------------------------------------------------------------
    def parameters(self) -> list:
        """Each parameter of this rank's parts once."""
        return list(dict.fromkeys(p for part in self.parts for p in part.parameters()))

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def eval(self) -> None:
        self.train(False)

    def autocast(self):
        dtype = self.compute_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.ctx.device.type, dtype=dtype)

    # --- a training step -------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict], on_gradients: Callable[[], None] | None = None) -> StepOutput:
        """One optimizer step over this rank's micro-batches. Each token's loss is divided by the token count of
        the whole step (all micro-batches, all data-parallel ranks), so the gradient equals one process's on the
        concatenated batch, whatever the layout, padding or accumulation. ``on_gradients()`` runs between the
        last backward and the update (fused optimizers have updated already)."""
        local = torch.stack([sum(count_loss_tokens(mb["labels"]) for mb in micro_batches),
                             sum(mb["attention_mask"].sum() for mb in micro_batches)]).float()
        loss_tokens, input_tokens = self.ctx.dp_sum(local).tolist()
        denominator = torch.tensor(max(loss_tokens, 1.0), device=self.ctx.device)
        self.begin_step(len(micro_batches))
        loss = sum(self.forward_backward(mb, denominator, last=i == len(micro_batches) - 1)
                   for i, mb in enumerate(micro_batches))
        loss = self.ctx.dp_sum(self.ctx.cp_sum(loss))  # each dp (and cp) rank holds its share of the step's mean
        if on_gradients is not None:
            on_gradients()
        metrics = expert_load_metrics(self.parts, self.ctx.dp_sum)
        return StepOutput(loss, int(loss_tokens), int(input_tokens), self.optimizer_step(loss), metrics)

    def begin_step(self, num_micro_batches: int) -> None:
        self.update.begin(num_micro_batches)

    def forward_backward(self, batch: dict, denominator: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch whose summed token loss is divided by ``denominator`` (the
        token count of the whole step, all micro-batches and dp ranks); returns that normalised loss."""
        set_gradient_sync(self.parts, last)  # reduce gradients once per step, not per micro-batch
        split = contextlib.nullcontext() if self.context_parallel is None else self.context_parallel.through_backward()
        with split:
            loss = (self.training_loss_sum(batch) + auxiliary_loss_sum(self.parts, batch["labels"])) / denominator
            self.update.backward(loss)
        return loss.detach()

    def optimizer_step(self, loss: torch.Tensor) -> StepResult:
        """End the step (``loss``: the step's global loss, to tell a non-finite step)."""
        return self.update.step(loss, self.parameters())

    def refresh_hessian(self, batch: dict, steps_done: int) -> None:
        """Sophia's Hessian estimate, refreshed every ``update_every`` steps from a sampled-label backward."""
        if sophia_refresh_due(self.optimizer, steps_done):
            refresh_hessian(self.optimizer, self.model, batch, lambda b: full_logits(self.forward(b)))

    # --- forward and losses ----------------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        """Logits of a batch (vocab-sharded under tensor parallelism)."""
        with self.autocast():
            return self.model(batch["input_ids"], **self.model_inputs(batch))

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword inputs besides the token ids: positions, the padding mask and, with
        ``data.document_masking``, each token's document (attention stays inside it, without a dense mask)."""
        inputs = {"position_ids": batch.get("position_ids"), "attention_mask": batch["attention_mask"]}
        if self.cfg.data.document_masking:
            inputs["document_ids"] = document_ids(batch["position_ids"])
        return inputs

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss of a batch, without backward (evaluation); the vocab-parallel loss never gathers
        full-vocabulary logits. Under context parallelism the cp ranks split the batch and sum their shares."""
        if self.context_parallel is not None:
            return self.ctx.cp_sum(self.sequence_shard_loss_sum(batch))
        return vocab_parallel_loss_sum(self.forward(batch), batch["labels"])

    def sequence_shard_loss_sum(self, batch: dict) -> torch.Tensor:
        """Context parallelism: the summed loss of this cp rank's share of the batch's tokens (its chunks of every
        sequence); attention sees the whole sequence through the k/v all-gather of ``ContextParallel``."""
        shard = self.context_parallel.shard(batch, self.cfg.data.document_masking)
        with self.context_parallel.attending(shard), self.autocast():
            logits = self.model(shard.input_ids, position_ids=shard.position_ids)
        return vocab_parallel_token_loss_sum(logits, shard.targets)

    def training_loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss to backpropagate: the vocab-parallel loss, or with ``train.loss_chunk_size`` the LM
        head and loss chunk by chunk (the model runs without its head, which then takes the hidden states)."""
        if self.context_parallel is not None:
            return self.sequence_shard_loss_sum(batch)
        chunk = self.cfg.train.loss_chunk_size
        if not chunk:
            return self.loss_sum(batch)
        head, self.model.lm_head = self.model.lm_head, None
        try:
            hidden = self.forward(batch)
        finally:
            self.model.lm_head = head
        logits = getattr(self.model, "logits", None)  # the head's output as logits (final soft-capping)
        project = head if logits is None else lambda h: logits(head(h))
        with self.autocast():
            return chunked_lm_loss_sum(project, hidden, batch["labels"], chunk)

    def generation_model(self):
        """What generation calls: ``(ids, position_ids=, attention_mask=[, cache=]) -> logits`` (the whole
        tp/dp-wrapped model, which takes a KV cache), and the multiple to pad inputs to (tp under sequence
        parallelism, which splits the sequence evenly; 1 otherwise)."""
        return self.parts[0], self.sequence_multiple

    @property
    def sequence_multiple(self) -> int:
        return self.ctx.tp if self.cfg.parallel.sequence_parallel else 1

    # --- checkpoints and export ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's tensors for DCP, by parameter name: ``{"model": …, "optim": …}``."""
        optim_tensors, _ = named_state.optimizer_state(self.parts, self.optimizer)
        return {"model": named_state.model_state(self.parts), "optim": optim_tensors}

    def extra_state(self) -> dict:
        """The JSON part of a checkpoint: optimizer settings and scalars, the loss scaler."""
        return {"optimizer": named_state.optimizer_state(self.parts, self.optimizer)[1],
                "loss_scaler": self.update.state_dict()}

    def prepare_load(self) -> None:
        """Create lazily-built optimizer state, so that ``state_dict()`` has every tensor to load into."""
        named_state.init_optimizer_state(self.optimizer)

    def load_state_dict(self, tensors: dict, extra: dict) -> None:
        """Restore from ``tensors`` (``state_dict()``'s structure, filled in place by DCP) and ``extra``."""
        named_state.load_model_state(self.parts, tensors["model"])
        named_state.load_optimizer_extras(self.parts, self.optimizer, extra["optimizer"])
        self.update.load_state_dict(extra.get("loss_scaler") or {})

    def save_files(self, directory: str) -> None:
        """Files an engine writes itself into a checkpoint directory (DeepSpeed's); none here."""

    def load_files(self, directory: str) -> None:
        """Read what ``save_files`` wrote."""

    def full_state_dict(self) -> dict:
        """The whole model's state dict (CPU tensors, Hugging Face names) on global rank 0, {} elsewhere. A
        collective: every rank calls."""
        if self.ctx.world_size == 1:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return gather_full_state_dict(self.model)

    def export(self, path: str, model_args) -> str | None:
        """Write the trained model from any layout (a Hugging Face directory, or a peft adapter under PEFT; see
        ``collie.peft.save_trained``): shards are gathered to global rank 0, which writes. Every rank calls."""
        from collie.models import build_model as build_arch
        from collie.peft import apply_peft, save_trained
        pretrained = self.cfg.model.pretrained
        if self.ctx.world_size == 1:
            return save_trained(self.model, path, pretrained)
        state, written = self.full_state_dict(), None
        if self.ctx.is_main_process:
            full = apply_peft(build_arch(model_args, device="meta"), self.cfg.peft, self.cfg.train.seed,
                              self.ctx.world_size)
            written = save_trained(full, path, pretrained, state)
        barrier()
        return written
