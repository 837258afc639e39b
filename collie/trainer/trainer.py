"""The training loop. One Trainer for every layout — one process or dp × tp × pp with ZeRO under torchrun.

Subclass and override ``train_fn`` / ``eval_fn`` to change what a step or an evaluation does, or add
``Callback``s to react to events. The parallel layout comes from ``config.parallel`` and the torchrun
environment; the loop itself does not change with it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from collie.config import CollieConfig
from collie.data.collate import pad_collate
from collie.data.loader import BatchStream
from collie.data.pretrain import document_causal_mask
from collie.distributed import barrier, clip_grad_norm_, full_logits, init_parallel, vocab_parallel_loss_sum
from collie.distributed.deepspeed_engine import build_deepspeed_model
from collie.errors import CollieError, ConfigError
from collie.evaluation import evaluators
from collie.log import setup_logging
from collie.monitor import Monitor, ProgressBar
from collie.monitor.meters import synchronize
from collie.optim import DynamicLossScaler, build_optimizer, refresh_hessian, sophia_refresh_due
from collie import builders
from collie.checkpoint import CheckpointManager, claim_output_dir
from collie.trainer import checkpoint as ckpt
from collie.callbacks import CallbackList
from collie.loss import chunked_lm_loss_sum, count_loss_tokens
from collie.trainer.schedule import build_scheduler

logger = logging.getLogger("collie")


class NonFiniteLossError(CollieError):
    """The loss or gradient norm was NaN/inf and ``train.on_nonfinite=stop``."""


@dataclass
class TrainerState:
    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0


class Trainer:
    def __init__(self, config: CollieConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                 callbacks=()):
        self.cfg = config
        self.ctx = init_parallel(config.parallel, builders.resolve_device(config.train.device).type)
        self.device, self.rank, self.world_size = self.ctx.device, self.ctx.rank, self.ctx.world_size
        if config.train.loss_chunk_size and self.world_size > 1:  # parallel.dp=-1 resolves only here
            raise ConfigError(f"train.loss_chunk_size runs in one process; this job has {self.world_size}: set "
                              f"train.loss_chunk_size=0")
        self.output_dir = config.train.output_dir
        if self.is_main_process:
            self.output_lock = claim_output_dir(config)  # one run per directory (collie/checkpoint/lock.py)
            config.save(os.path.join(self.output_dir, "config.yaml"))
        barrier()
        setup_logging(self.output_dir, self.is_main_process, self.rank)
        torch.manual_seed(config.train.seed)

        self.tokenizer = tokenizer or builders.build_tokenizer(config)
        self.model_args = model.args if model is not None else builders.build_model_args(config.model)
        builders.check_vocab(self.tokenizer, self.model_args)
        self.model = model or builders.build_model(config, self.model_args, self.ctx)
        self.num_trainable, self.num_params = builders.count_parameters(self.model, self.ctx)

        self.train_dataset = train_dataset or self._load_data(config.data.train_files, "train")
        eval_files = config.data.eval_files
        self.eval_dataset = eval_dataset or (self._load_data(eval_files, "eval") if eval_files else None)

        self._build_optimizer()
        self.state = TrainerState()
        self.batches = self.train_batches()
        self.callbacks = CallbackList([ProgressBar(), Monitor(), *callbacks])
        self.checkpointer = CheckpointManager(os.path.join(self.output_dir, "checkpoints"),
                                                   config.checkpoint.keep_last)
        self._stop_requested = False
        ckpt.resume_trainer(self)

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def model_parts(self) -> list:
        """The modules this rank holds (pipeline stages), or the whole model."""
        return getattr(self.model, "parts", [self.model])

    @property
    def has_evaluation(self) -> bool:
        return self.eval_dataset is not None or bool(self.cfg.eval.choice_file)

    @property
    def deepspeed(self) -> bool:
        return self.cfg.parallel.engine == "deepspeed"

    @property
    def pipeline(self):
        """The pipeline runner when ``parallel.pp > 1``, else None."""
        return getattr(self.model, "runner", None)

    def autocast(self):
        dtype = builders.compute_dtype(self.cfg)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    # --- setup -----------------------------------------------------------------------------------------------
    def _load_data(self, files, split):
        dataset, stats = builders.build_dataset(self.cfg, self.tokenizer, files, self.model_args,
                                                self.is_main_process, barrier)
        logger.info("%s data: %d samples from %s (%s)", split, len(dataset), ", ".join(files), stats)
        return dataset

    def _build_optimizer(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.cfg, trainable)
        if hasattr(self.model, "prepare_optimizer"):
            self.model.prepare_optimizer(self.optimizer)  # ZeRO-1 shards the optimizer state
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps)
        self.fused = getattr(self.optimizer, "fused_backward", False)
        fp16 = builders.compute_dtype(self.cfg) == torch.float16
        # fused optimizers scale inside backward; DeepSpeed scales itself
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16 and not self.fused and not self.deepspeed)
        if self.fused:  # LOMO / AdaLomo update inside backward; FSDP2/replicate have already reduced the gradient
            # [reliability] all-or-nothing non-finite steps unless optim.args.guard_nonfinite=false (fused.py)
            self.optimizer.setup_training(dp_group=self.ctx.dp_group, grad_reduce="none",
                                          loss_scaler=DynamicLossScaler() if fp16 else None,
                                          guard_nonfinite=self.cfg.optim.args.get("guard_nonfinite", True))
        if self.deepspeed:  # it reduces, clips, scales and steps from here on
            self.model = build_deepspeed_model(self.model, self.optimizer, self.cfg, self.ctx)

    def collate(self, samples):
        """Pad a batch to its longest sample; under pipeline parallelism always to ``data.seq_len`` (stages fix
        their shapes), under sequence parallelism to a multiple of tp (the sequence is split evenly)."""
        pad_to = self.cfg.data.pad_to_multiple_of
        if self.ctx.pp > 1:
            pad_to = self.cfg.data.seq_len
        elif self.cfg.parallel.sequence_parallel:
            pad_to = math.lcm(pad_to or 1, self.ctx.tp)
        batch = pad_collate(samples, self.tokenizer.pad_token_id, pad_to)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_batches(self) -> BatchStream:
        return BatchStream(self.train_dataset, self.cfg.train.micro_batch_size, self.collate,
                           seed=self.cfg.train.seed, shuffle=self.cfg.data.shuffle,
                           dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp)

    def eval_batches(self):
        """This data-parallel rank's share of the evaluation batches (every dp-th batch)."""
        size, total = self.cfg.eval.batch_size, len(self.eval_dataset)
        if self.cfg.eval.max_batches is not None:
            total = min(total, self.cfg.eval.max_batches * size)
        for index, start in enumerate(range(0, total, size)):
            if index % self.ctx.dp == self.ctx.dp_rank:
                yield self.collate([self.eval_dataset[i] for i in range(start, min(start + size, total))])

    # --- loop ------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train for ``train.max_steps`` optimizer steps; returns the final evaluation results (if any)."""
        cfg = self.cfg
        logger.info("model: %s, %.2fM parameters (%.2fM trainable) on %s (%s); layout dp=%d tp=%d pp=%d zero=%d",
                    self.model_args.architecture, self.num_params / 1e6, self.num_trainable / 1e6, self.device,
                    cfg.train.precision,
                    self.ctx.dp, self.ctx.tp, self.ctx.pp, cfg.parallel.zero_stage)
        self.model.train()
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop)
        self.callbacks.fire("on_train_begin", self)
        if self.has_evaluation and cfg.eval.before_training and self.state.step == 0:
            self.evaluate()
        while self.state.step < cfg.train.max_steps:
            self.callbacks.fire("on_step_begin", self)
            t0 = time.perf_counter()
            micro_batches = [next(self.batches) for _ in range(cfg.train.grad_accum_steps)]
            data_time = time.perf_counter() - t0
            metrics = self.train_fn(micro_batches)
            synchronize(self.device)  # CUDA runs asynchronously: the step's kernels finish before the clock is read
            self.state.step += 1
            metrics.update(step_time_s=time.perf_counter() - t0, data_time_s=data_time)
            self.callbacks.fire("on_step_end", self, metrics)
            if self._stop_agreed():
                logger.warning("SIGTERM received: saving a checkpoint at step %d and stopping", self.state.step)
                self.save_checkpoint()
                break
            if self._due(cfg.eval.every_steps) and self.has_evaluation:
                self.evaluate()
            if self._due(cfg.checkpoint.every_steps):
                self.save_checkpoint()
        signal.signal(signal.SIGTERM, previous_handler)
        finished = self.state.step >= cfg.train.max_steps
        results = self.evaluate() if self.has_evaluation and finished else {}
        every = cfg.checkpoint.every_steps
        if finished and (cfg.checkpoint.save_final or (every and self.state.step % every == 0)):
            self.save_checkpoint()
        if finished and cfg.checkpoint.save_final:
            self.save_model(os.path.join(self.output_dir, "final"))
        self.callbacks.fire("on_train_end", self)
        return results

    def _due(self, every: int) -> bool:
        """True every ``every`` steps before the last one (the last step has its own evaluation and save)."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any rank received SIGTERM (all ranks must save the checkpoint together)."""
        flag = torch.tensor(float(self._stop_requested), device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    # --- one step --------------------------------------------------------------------------------------------
    def train_fn(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches. Each token's loss is divided by the token count of
        the whole step (all micro-batches, all data-parallel ranks), so the gradient equals one process's on the
        concatenated batch, whatever the layout, padding or accumulation."""
        local = torch.stack([sum(count_loss_tokens(mb["labels"]) for mb in micro_batches),
                             sum(mb["attention_mask"].sum() for mb in micro_batches)]).float()
        loss_tokens, input_tokens = self.ctx.dp_sum(local).tolist()
        denominator = torch.tensor(max(loss_tokens, 1.0), device=self.device)
        if self.fused:
            self.optimizer.begin_step(len(micro_batches))
        loss = sum(self._forward_backward(mb, denominator, last=i == len(micro_batches) - 1)
                   for i, mb in enumerate(micro_batches))
        loss = self.ctx.dp_sum(loss)  # each dp rank holds its share of the step's mean
        finite, grad_norm = self._fused_step() if self.fused else self._optimizer_step(loss)
        if finite:
            self.scheduler.step()
            self._refresh_hessian(micro_batches[-1])
        else:
            self._handle_nonfinite(loss, grad_norm)
        self.state.tokens_seen += int(input_tokens)
        return {"loss": float(loss), "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                "num_tokens": int(input_tokens), "loss_tokens": int(loss_tokens),
                "skipped_steps": self.state.skipped_steps}

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits of a batch (vocab-sharded under tensor parallelism; not for pipeline parallelism)."""
        with self.autocast():
            return self.model(batch["input_ids"], position_ids=batch.get("position_ids"),
                              attention_mask=self.attention_mask(batch))

    def attention_mask(self, batch: dict) -> torch.Tensor:
        """The padding mask, or with ``data.document_masking`` a (batch, 1, seq, seq) per-document mask."""
        if not self.cfg.data.document_masking:
            return batch["attention_mask"]
        return document_causal_mask(batch["position_ids"]) & batch["attention_mask"].bool()[:, None, None, :]

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss of a batch; the vocab-parallel loss never gathers full-vocabulary logits."""
        if self.pipeline is not None:
            return self.pipeline.eval_forward(batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                              self.attention_mask(batch))
        return vocab_parallel_loss_sum(self.forward(batch), batch["labels"])

    def training_loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss to backpropagate: the vocab-parallel loss, or with ``train.loss_chunk_size`` the LM
        head and loss chunk by chunk (the model runs without its head, which then takes the hidden states)."""
        chunk = self.cfg.train.loss_chunk_size
        if not chunk:
            return vocab_parallel_loss_sum(self.forward(batch), batch["labels"])
        head, self.model.lm_head = self.model.lm_head, None
        try:
            hidden = self.forward(batch)
        finally:
            self.model.lm_head = head
        with self.autocast():
            return chunked_lm_loss_sum(head, hidden, batch["labels"], chunk)

    def _forward_backward(self, batch: dict, denominator: torch.Tensor, last: bool) -> torch.Tensor:
        if hasattr(self.model, "set_gradient_sync"):
            self.model.set_gradient_sync(last)  # reduce gradients once per step, not per micro-batch
        if self.pipeline is not None:
            with self.autocast():
                return self.pipeline.step(batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                          self.attention_mask(batch), loss_denominator=denominator)
        loss = self.training_loss_sum(batch) / denominator
        if self.fused:
            self.optimizer.backward(loss)  # updates parameters inside backward on the last micro-batch
        elif self.deepspeed:
            self.model.backward(loss)  # and DeepSpeed's step, which updates after the last micro-batch
        else:
            self.scaler.scale(loss).backward()
        return loss.detach()

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[bool, torch.Tensor]:
        if self.deepspeed:  # already stepped; DeepSpeed skips overflowing fp16 steps itself
            return bool(torch.isfinite(loss)), self.model.grad_norm()
        grad_norm = self._clip_gradients()
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    def _fused_step(self) -> tuple[bool, torch.Tensor]:
        result = self.optimizer.step()
        if result.partial:
            logger.warning("step %d: non-finite gradients after some parameters were updated (enable "
                           "optim.args.guard_nonfinite for all-or-nothing steps)", self.state.step + 1)
        return result.finite, torch.tensor(result.grad_norm)

    def _refresh_hessian(self, batch: dict) -> None:
        """Sophia's Hessian estimate, refreshed every ``update_every`` steps from a sampled-label backward."""
        if sophia_refresh_due(self.optimizer, self.state.step + 1):
            refresh_hessian(self.optimizer, self.model, batch, lambda b: full_logits(self.forward(b)))

    def _clip_gradients(self) -> torch.Tensor:
        """Unscale, clip by value and by the global norm (as configured) and return the global gradient norm,
        computed over the full model whatever the sharding."""
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.optim.clip_grad_value:
            torch.nn.utils.clip_grad_value_(params, self.cfg.optim.clip_grad_value)
        return clip_grad_norm_(params, self.cfg.optim.clip_grad_norm or math.inf, self.ctx)

    def _handle_nonfinite(self, loss, grad_norm):
        self.state.skipped_steps += 1
        message = (f"step {self.state.step + 1}: non-finite loss {float(loss)} / grad norm {float(grad_norm)}; "
                   f"weights and optimizer state left unchanged")
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLossError(message + " (train.on_nonfinite=stop)")
        logger.warning(message + "; step skipped")

    # --- evaluation and saving -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.model.eval()
        results = self.eval_fn()
        self.model.train()
        logger.info("eval at step %d: %s", self.state.step,
                    ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
        self.callbacks.fire("on_evaluate", self, results)
        return results

    def eval_fn(self) -> dict:
        cfg, results = self.cfg.eval, {}
        if "perplexity" in cfg.metrics and self.eval_dataset is not None:
            results.update(evaluators.perplexity(self.eval_batches(), self.loss_sum, self.ctx.dp_sum))
        limit = None if cfg.max_batches is None else cfg.max_batches * cfg.batch_size
        # the whole tp/dp-wrapped model, whose forward takes a KV cache, or under pp the pipeline's last-position
        # logits (recomputed per token); sequence parallel splits the sequence evenly: pad to a multiple of tp
        model, multiple = self.model_parts[0], self.ctx.tp if self.cfg.parallel.sequence_parallel else 1
        if self.pipeline is not None:
            model = self.pipeline.last_logits
        text_metrics = [m for m in cfg.metrics if m in evaluators.TEXT_METRICS]
        with self.autocast():
            if text_metrics and self.eval_dataset is not None:
                results.update(evaluators.generation_metrics(
                    model, self.eval_dataset, self.tokenizer, cfg.batch_size, cfg.max_new_tokens, limit,
                    self.device, text_metrics, cfg.stop, multiple))
            if any(m in evaluators.CHOICE_METRICS for m in cfg.metrics):
                results.update(evaluators.choice_eval(
                    model, evaluators.load_choice_records(cfg.choice_file), self.tokenizer, cfg.batch_size,
                    limit, self.device, f1="classification" in cfg.metrics, pad_to_multiple_of=multiple))
        return results

    def save_checkpoint(self) -> str:
        """Model, optimizer, scheduler, data position, trainer state and RNG, as ``checkpoints/step-N``."""
        path = ckpt.save_trainer(self)
        self.callbacks.fire("on_save", self, path)
        logger.info("saved checkpoint %s", path)
        return path

    def save_model(self, path: str) -> None:
        """Write the model as a Hugging Face directory (gathered from every rank), with the tokenizer."""
        written = builders.save_hf_model(self.model, self.model_args, self.cfg, self.ctx, path)
        if self.is_main_process and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
        self.callbacks.fire("on_save", self, path)
        logger.info("saved %s to %s", written or "model", path)
