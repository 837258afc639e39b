"""The monitor callback: adds throughput, MFU and memory to each step's metrics and writes them to the sinks."""
from __future__ import annotations

from collie.monitor import meters
from collie.monitor.sinks import build_sinks
from collie.trainer.callbacks import Callback


class Monitor(Callback):
    def __init__(self):
        self.sinks = []
        self.meter = None

    def on_train_begin(self, trainer):
        cfg, args = trainer.cfg, trainer.model_args
        flops = meters.flops_per_token(trainer.num_params, args.num_hidden_layers, args.hidden_size,
                                       cfg.data.seq_len)
        peak = meters.device_peak_tflops(trainer.device, cfg.monitor.peak_tflops)
        self.meter = meters.StepMeter(flops, peak, trainer.world_size)
        if trainer.is_main_process:
            self.sinks = build_sinks(cfg, trainer.output_dir)

    def on_step_begin(self, trainer):
        meters.reset_peak_memory(trainer.device)

    def on_step_end(self, trainer, metrics):
        metrics.update(self.meter.throughput(metrics["num_tokens"], metrics["step_time_s"]))
        metrics.update(meters.memory_stats(trainer.device))
        step = trainer.state.step
        if step % trainer.cfg.train.log_every == 0 or step == trainer.cfg.train.max_steps:
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


class ProgressBar(Callback):
    """A rich progress bar on the main process, showing the latest loss."""

    def __init__(self):
        self.progress, self.task = None, None

    def on_train_begin(self, trainer):
        if not (trainer.is_main_process and trainer.cfg.train.progress_bar):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task("train", total=trainer.cfg.train.max_steps,
                                           completed=trainer.state.step, loss="-")
        self.progress.start()

    def on_step_end(self, trainer, metrics):
        if self.progress:
            self.progress.update(self.task, completed=trainer.state.step, loss=f"{metrics['loss']:.4f}")

    def on_train_end(self, trainer):
        if self.progress:
            self.progress.stop()
            self.progress = None
