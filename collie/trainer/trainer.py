"""The training loop. One Trainer for every layout — one process or dp × tp × pp with ZeRO under torchrun.

Subclass and override ``train_fn`` / ``eval_fn`` to change what a step or an evaluation does, or add
``Callback``s to react to events. The parallel layout comes from ``config.parallel`` and the torchrun
environment; the loop itself does not change with it.
"""
from __future__ import annotations

import logging
import logging.handlers
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from collie import builders
from collie.callbacks import CallbackList
from collie.checkpoint import CheckpointManager, claim_output_dir
from collie.config import CollieConfig, check_output_dir
from collie.data.collate import pad_collate
from collie.data.loader import BatchStream
from collie.data.templates import resolve_template, stop_token_ids
from collie.data.templates import save_chat_files
from collie.distributed import barrier, init_parallel
from collie.distributed.watchdog import NoWatchdog, start_watchdog
from collie.engine import build_engine
from collie.errors import CollieError, ConfigError
from collie.evaluation import evaluators
from collie.layout_rules import check_loss_chunk
from collie.log import setup_logging
from collie.loss import IGNORE_INDEX
from collie.monitor import Monitor, ProgressBar
from collie.monitor.meters import synchronize
from collie.trainer import checkpoint as ckpt
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
        """Everything is checked before anything is written: config, tokenizer, model, layout and data first;
        only then is ``train.output_dir`` claimed and ``config.yaml`` written, so a bad input leaves an earlier
        run's directory as it was. (A pretraining token cache, by default under ``<output_dir>/data_cache``, is
        written after the tokenizer, model and layout passed; a failed tokenization removes what it created.)"""
        self.cfg = config
        check_output_dir(config)
        self.ctx = init_parallel(config.parallel, builders.resolve_device(config.train.device).type)
        self.device, self.rank, self.world_size = self.ctx.device, self.ctx.rank, self.ctx.world_size
        # parallel.dp=-1 resolves only here
        check_loss_chunk(config.train.loss_chunk_size, self.ctx.dp, self.ctx.tp, self.ctx.pp, config.peft.method)
        self.output_dir = config.train.output_dir
        setup_logging(None, self.is_main_process, self.rank)  # console only until the directory is claimed
        early_log = logging.handlers.BufferingHandler(capacity=1 << 20)  # replayed into train.log below
        logger.addHandler(early_log)
        torch.manual_seed(config.train.seed)

        self.tokenizer = tokenizer or builders.build_tokenizer(config)
        self.model_args = model.args if model is not None else builders.build_model_args(config.model)
        builders.check_vocab(self.tokenizer, self.model_args)
        self.engine = build_engine(config, self.ctx, self.model_args, model)
        self.num_trainable, self.num_params = builders.count_parameters(self.engine.parts, self.ctx)

        self.train_dataset = train_dataset or self._load_data(config.data.train_files, "train")
        eval_files = config.data.eval_files
        self.eval_dataset = eval_dataset or (self._load_data(eval_files, "eval") if eval_files else None)
        self.train_dataset, self.eval_dataset = builders.split_eval_data(config, self.train_dataset, self.eval_dataset)
        builders.resolve_max_steps(config, len(self.train_dataset), self.ctx.dp)  # train.epochs → max_steps

        self.scheduler = build_scheduler(self.optimizer, config.optim, config.train.max_steps)
        self.state = TrainerState()
        self.batches = self.train_batches()

        if self.is_main_process:  # all checked: now the run directory is claimed and written
            try:
                self.output_lock = claim_output_dir(config)  # one run per directory (collie/checkpoint/lock.py)
                config.save(os.path.join(self.output_dir, "config.yaml"))
            except OSError as e:
                raise ConfigError(f"train.output_dir={self.output_dir}: cannot write there "
                                  f"({e.strerror or e}); choose a directory you can write to") from None
        barrier()
        records = list(early_log.buffer)
        setup_logging(self.output_dir, self.is_main_process, self.rank)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                for record in records:
                    handler.handle(record)
        self.callbacks = CallbackList([ProgressBar(), Monitor(), *callbacks])
        self.checkpointer = CheckpointManager(os.path.join(self.output_dir, "checkpoints"),
                                                   config.checkpoint.keep_last)
        self._stop_requested = 0  # the number of the signal that asked to stop
        self.watchdog = NoWatchdog()  # fit() starts the real one
        ckpt.resume_trainer(self)

    # --- properties ------------------------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def model(self):
        """The model as the engine runs it (a module, or this rank's pipeline stages as a ``ParallelModel``)."""
        return self.engine.model

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def model_parts(self) -> list:
        """The modules this rank holds (pipeline stages), or the whole model."""
        return self.engine.parts

    @property
    def has_evaluation(self) -> bool:
        return self.eval_dataset is not None or bool(self.cfg.eval.choice_file)

    def autocast(self):
        return self.engine.autocast()

    # --- setup -----------------------------------------------------------------------------------------------
    def _load_data(self, files, split):
        dataset, stats = builders.build_dataset(self.cfg, self.tokenizer, files, self.model_args,
                                                self.is_main_process, barrier)
        logger.info("%s data: %d samples from %s (%s)", split, len(dataset), ", ".join(files), stats)
        return dataset

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
        """This data-parallel rank's share of the evaluation batches (every dp-th batch).

        In lockstep: with several ranks every rank gets the same number of batches of the same shape (the short
        last batch, and a rank's missing batches, are filled with loss-free copies of a sample), because a
        forward may hold collectives (ZeRO-2/3 gathers parameters over dp, pipeline stages fix their shapes);
        a rank that ran one forward more than its peers would wait for them forever."""
        size, total = self.cfg.eval.batch_size, len(self.eval_dataset)
        if self.cfg.eval.max_batches is not None:
            total = min(total, self.cfg.eval.max_batches * size)
        starts = range(0, total, size)
        lockstep = self.world_size > 1
        filler = {**self.eval_dataset[0], "labels": torch.full_like(self.eval_dataset[0]["labels"], IGNORE_INDEX)}
        for index in range(self.ctx.dp_rank, -(-len(starts) // self.ctx.dp) * self.ctx.dp, self.ctx.dp):
            samples = [self.eval_dataset[i] for i in range(starts[index], min(starts[index] + size, total))] \
                if index < len(starts) else []
            if samples or lockstep:
                yield self.collate(samples + [filler] * (size - len(samples) if lockstep else 0))

    # --- loop ------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train for ``train.max_steps`` optimizer steps; returns the final evaluation results (if any).

        SIGTERM or SIGINT (Ctrl-C) on any rank: all ranks save a checkpoint after the current step and stop.
        Under several processes a watchdog ends the job when a rank makes no progress for
        ``parallel.timeout_s`` (``collie.distributed.watchdog``)."""
        cfg = self.cfg
        logger.info("model: %s, %.2fM parameters (%.2fM trainable) on %s (%s); layout dp=%d tp=%d pp=%d zero=%d",
                    self.model_args.architecture, self.num_params / 1e6, self.num_trainable / 1e6, self.device,
                    cfg.train.precision, self.ctx.dp, self.ctx.tp, self.ctx.pp, cfg.parallel.zero_stage)
        self.watchdog = start_watchdog(self.ctx)
        for part in self.engine.parts:
            self.watchdog.watch_module(part)
        handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.engine.train()
            self.callbacks.fire("on_train_begin", self)
            if self.has_evaluation and cfg.eval.before_training and self.state.step == 0:
                self.evaluate()
            self._train_loop()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        try:
            results = self._finish()
        finally:
            self.watchdog.stop()
        self.callbacks.fire("on_train_end", self)
        return results

    def _train_loop(self) -> None:
        cfg = self.cfg
        while self.state.step < cfg.train.max_steps:
            with self.watchdog.operation(f"training step {self.state.step + 1}"):
                self._train_step()
                stop = self._stop_agreed()
            if stop:
                logger.warning("%s received: saving a checkpoint at step %d and stopping", stop, self.state.step)
                self.save_checkpoint()
                return
            if self._due(cfg.eval.every_steps) and self.has_evaluation:
                self.evaluate()
            if self._due(cfg.checkpoint.every_steps):
                self.save_checkpoint()

    def _train_step(self) -> None:
        self.callbacks.fire("on_step_begin", self)
        t0 = time.perf_counter()
        micro_batches = [next(self.batches) for _ in range(self.cfg.train.grad_accum_steps)]
        data_time = time.perf_counter() - t0
        metrics = self.train_fn(micro_batches)
        synchronize(self.device)  # CUDA runs asynchronously: the step's kernels finish before the clock is read
        self.state.step += 1
        metrics.update(step_time_s=time.perf_counter() - t0, data_time_s=data_time)
        self.callbacks.fire("on_step_end", self, metrics)

    def _finish(self) -> dict:
        """After the last step: the final checkpoint and model first (a failing evaluation loses nothing), then
        the final evaluation."""
        cfg = self.cfg
        if self.state.step < cfg.train.max_steps:
            return {}
        self._refuse_nonfinite_result()
        every = cfg.checkpoint.every_steps
        if cfg.checkpoint.save_final or (every and self.state.step % every == 0):
            self.save_checkpoint()
        if cfg.checkpoint.save_final:
            self.save_model(os.path.join(self.output_dir, "final"))
        return self.evaluate() if self.has_evaluation else {}

    def _refuse_nonfinite_result(self) -> None:
        """A run whose every step was skipped, or whose weights are not finite, saves and exports nothing and
        ends with an error (exit code 2 from ``collie train``) instead of writing a useless ``final/``."""
        finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                     for part in self.engine.parts for p in part.parameters())
        flag = torch.tensor(int(finite), device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        steps, skipped = self.state.step, self.state.skipped_steps
        if flag and skipped < steps:
            return
        what = f"all {steps} steps were skipped (non-finite loss or gradients)" if flag else \
            f"the weights are not finite after {steps} steps ({skipped} skipped)"
        raise NonFiniteLossError(f"{what}; no final checkpoint or model was saved; lower optim.lr, raise "
                                 f"optim.warmup_steps or check the data and train.precision")

    def _due(self, every: int) -> bool:
        """True every ``every`` steps before the last one (the last step has its own evaluation and save)."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    def _request_stop(self, signum, frame):
        if signum == signal.SIGINT and self._stop_requested:
            raise KeyboardInterrupt  # Ctrl-C twice: stop at once, without the checkpoint
        self._stop_requested = signum
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop now)")

    def _stop_agreed(self) -> str:
        """The signal (SIGTERM or SIGINT) any rank received, or "": all ranks save the checkpoint together."""
        signum = torch.tensor(self._stop_requested, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        return signal.Signals(int(signum)).name if signum else ""

    # --- one step --------------------------------------------------------------------------------------------
    def train_fn(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches (``Engine.train_step``), then the schedule."""
        step = self.engine.train_step(micro_batches)
        if step.result.finite:
            self.scheduler.step()
            self.engine.refresh_hessian(micro_batches[-1], self.state.step + 1)
        else:
            self._handle_nonfinite(step.loss, step.result)
        self.state.tokens_seen += step.input_tokens
        return {"loss": float(step.loss), "grad_norm": step.result.grad_norm, "lr": self.scheduler.get_last_lr()[0],
                "num_tokens": step.input_tokens, "loss_tokens": step.loss_tokens,
                "skipped_steps": self.state.skipped_steps, **step.metrics}

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits of a batch (vocab-sharded under tensor parallelism; not for pipeline parallelism)."""
        return self.engine.forward(batch)

    def _handle_nonfinite(self, loss, result):
        self.state.skipped_steps += 1
        kept = ("the parameters with finite gradients were updated, the others left unchanged" if result.partial
                else "weights and optimizer state left unchanged")
        message = f"step {self.state.step + 1}: non-finite loss {float(loss)} / grad norm {result.grad_norm}; {kept}"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLossError(message + " (train.on_nonfinite=stop)")
        logger.warning(message + "; step skipped")

    # --- evaluation and saving -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.engine.eval()
        with self.watchdog.operation(f"evaluation at step {self.state.step}"):
            results = self.eval_fn()
        self.engine.train()
        logger.info("eval at step %d: %s", self.state.step,
                    ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
        self.callbacks.fire("on_evaluate", self, results)
        return results

    def eval_fn(self) -> dict:
        cfg, results = self.cfg.eval, {}
        if "perplexity" in cfg.metrics and self.eval_dataset is not None:
            results.update(evaluators.perplexity(self.eval_batches(), self.engine.loss_sum, self.ctx.dp_sum))
        limit = None if cfg.max_batches is None else cfg.max_batches * cfg.batch_size
        model, multiple = self.engine.generation_model()
        text_metrics = [m for m in cfg.metrics if m in evaluators.TEXT_METRICS]
        with self.autocast():
            if text_metrics and self.eval_dataset is not None:
                ends = stop_token_ids(resolve_template(self.cfg.data.template, self.tokenizer), self.tokenizer)
                results.update(evaluators.generation_metrics(
                    model, self.eval_dataset, self.tokenizer, cfg.batch_size, cfg.max_new_tokens, limit,
                    self.device, text_metrics, cfg.stop, multiple, eos_ids=ends))
            if any(m in evaluators.CHOICE_METRICS for m in cfg.metrics):
                results.update(evaluators.choice_eval(
                    model, evaluators.load_choice_records(cfg.choice_file), self.tokenizer, cfg.batch_size,
                    limit, self.device, f1="classification" in cfg.metrics, pad_to_multiple_of=multiple))
        return results

    def save_checkpoint(self) -> str:
        """Model, optimizer, scheduler, data position, trainer state and RNG, as ``checkpoints/step-N``."""
        with self.watchdog.operation(f"checkpoint save at step {self.state.step}"):
            path = ckpt.save_trainer(self)
        self.callbacks.fire("on_save", self, path)
        logger.info("saved checkpoint %s", path)
        return path

    def save_model(self, path: str) -> None:
        """Write the model as a Hugging Face directory (gathered from every rank), with the tokenizer, the chat
        template training used and the generation config."""
        with self.watchdog.operation(f"saving the model to {path}"):
            written = self.engine.export(path, self.model_args)
        if self.is_main_process and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(path)
            save_chat_files(path, self.cfg.data, self.tokenizer)
        self.callbacks.fire("on_save", self, path)
        logger.info("saved %s to %s", written or "model", path)
