"""The monitor callback: adds throughput, MFU and memory to each step's metrics and writes them to the sinks."""
from __future__ import annotations

import json
import os

import torch

from collie.monitor import meters
from collie.monitor.sinks import build_sinks
from collie.callbacks import Callback
from collie.log import console_is_terminal


class Monitor(Callback):
    """Adds tokens/s per device (non-padding tokens), MFU and memory to every step's metrics; logs every
    ``train.log_every`` steps and the last one to the sinks, and writes ``run_info.json`` (model size, layout,
    FLOPs per token, device peak) once."""

    def __init__(self):
        self.sinks = []
        self.meter = None

    def on_train_begin(self, trainer):
        cfg, args = trainer.cfg, trainer.model_args
        flops = meters.flops_per_token(trainer.num_params, args.num_hidden_layers, args.hidden_size,
                                       cfg.data.seq_len, trainer.num_trainable)
        peak = meters.device_peak_tflops(trainer.device, cfg.monitor.peak_tflops)
        self.meter = meters.StepMeter(flops, peak, trainer.world_size)
        if trainer.is_main_process:
            self.sinks = build_sinks(cfg, trainer.output_dir)
            write_run_info(trainer, flops, peak)

    def on_step_begin(self, trainer):
        meters.synchronize(trainer.device)  # the trainer's clock starts next: earlier queued work is not this step's
        meters.reset_peak_memory(trainer.device)

    def on_step_end(self, trainer, metrics):
        metrics.update(self.meter.throughput(metrics["num_tokens"], metrics["step_time_s"]))
        metrics.update(meters.memory_stats(trainer.device))
        step = trainer.state.step
        if step % trainer.cfg.train.log_every == 0 or step == trainer.cfg.train.max_steps:
            if trainer.world_size > 1:  # pipeline stages and ranks differ; the job needs the largest
                metrics["peak_mem_gib_max_rank"] = meters.max_over_ranks(metrics["peak_mem_gib"], trainer.device)
            trainer.callbacks.fire("on_log", trainer, metrics)

    def on_log(self, trainer, metrics):
        for sink in self.sinks:
            sink.write(trainer.state.step, metrics)

    def on_evaluate(self, trainer, results):
        trainer.callbacks.fire("on_log", trainer, {f"eval/{k}": v for k, v in results.items()})

    def on_train_end(self, trainer):
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def write_run_info(trainer, flops_per_token: float, peak_tflops: float | None) -> None:
    """``run_info.json``: what a step's metrics are relative to (model size, layout, FLOPs, device)."""
    device = trainer.device
    info = {"num_params": trainer.num_params, "num_trainable": trainer.num_trainable,
            "world_size": trainer.world_size, "dp": trainer.ctx.dp, "tp": trainer.ctx.tp, "pp": trainer.ctx.pp,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "peak_tflops": peak_tflops, "flops_per_token": flops_per_token, "seq_len": trainer.cfg.data.seq_len}
    with open(os.path.join(trainer.output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)


class ProgressBar(Callback):
    """A rich progress bar on the main process, showing the latest loss and non-padding tokens/s per device; only
    on a terminal (in a file or a pipe it would be frozen frames among the log lines)."""

    def __init__(self):
        self.progress, self.task = None, None

    def on_train_begin(self, trainer):
        if not (trainer.is_main_process and trainer.cfg.train.progress_bar and console_is_terminal()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s/dev"),
                                 TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task("train", total=trainer.cfg.train.max_steps,
                                           completed=trainer.state.step, loss="-", speed="-")
        self.progress.start()

    def on_step_end(self, trainer, metrics):
        if self.progress:
            speed = metrics["num_tokens"] / max(metrics["step_time_s"], 1e-9) / trainer.world_size
            self.progress.update(self.task, completed=trainer.state.step, loss=f"{metrics['loss']:.4f}",
                                 speed=f"{speed:,.0f}")

    def on_train_end(self, trainer):
        if self.progress:
            self.progress.stop()
            self.progress = None
