"""Runs ``collie train`` (the real CLI) with faults injected, as one rank of run_distributed/torchrun or alone.

    python fault_worker.py --fault=kill-in-save:4:1 train CONFIG overrides…

Faults (STEP is 1-based, RANK the global rank; '*' = every rank):

* ``kill-in-save:STEP:RANK`` — SIGKILL while the checkpoint of STEP is being written (tensor files are in
  ``.tmp-step-N``, the trainer state is not);
* ``sigterm:STEP:RANK`` — SIGTERM (preemption) in the middle of STEP (from the forward pass);
* ``sigint:STEP:RANK`` — SIGINT (Ctrl-C) in the middle of STEP;
* ``die:STEP:RANK`` — SIGKILL in the middle of STEP (from the forward pass);
* ``stall:STEP:RANK`` — sleep for an hour in the middle of STEP (from the forward pass): a rank that hangs;
* ``skip-eval:RANK`` — skip every evaluation: a rank that takes another branch than its peers;
* ``record`` — write each step's loss and this process's RSS (MiB) as the rank result.

Under torchrun, a restarted worker group (``--max-restarts``) runs without the faults.
"""
from __future__ import annotations

import os
import signal
import sys
import time

from collie.cli import main
from collie.distributed.launch import write_rank_result
from collie.trainer import Callback, Trainer
from collie.checkpoint import store as ckpt

RANK = int(os.environ.get("RANK", "0"))
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "die": signal.SIGKILL}


def _mine(rank: str) -> bool:
    return rank == "*" or int(rank) == RANK


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class SignalInStep(Callback):
    """Sends ``signum`` to this process from the model's forward pass of step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum, self.handle = step, signum, None

    def on_step_begin(self, trainer):
        if trainer.state.step + 1 == self.step:
            self.handle = trainer.model_parts[0].register_forward_pre_hook(self._fire)

    def _fire(self, module, args):
        self.handle.remove()
        os.kill(os.getpid(), self.signum)


class StallInStep(SignalInStep):
    """Sleeps for an hour in the model's forward pass of step ``step``."""

    def _fire(self, module, args):
        self.handle.remove()
        time.sleep(3600)


class Record(Callback):
    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer, metrics):
        self.rows.append({"step": trainer.state.step, "loss": metrics["loss"], "rss_mib": rss_mib()})

    def on_train_end(self, trainer):
        write_rank_result(self.rows)


def kill_in_save(step: int) -> None:
    original = ckpt.CheckpointManager.save

    def save(self, at_step, *args, **kwargs):
        if at_step == step:  # rng_state() runs after DCP has written this rank's tensors into .tmp-step-N
            ckpt.rng_state = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return original(self, at_step, *args, **kwargs)

    ckpt.CheckpointManager.save = save


def install(specs: list[str]) -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        specs = [s for s in specs if s == "record"]  # a torchrun restart runs without the fault
    callbacks = []
    for spec in specs:
        kind, *rest = spec.split(":")
        if kind == "record":
            callbacks.append(Record())
        elif kind == "skip-eval":
            if _mine(rest[0]):
                Trainer.eval_fn = lambda self: {}
        elif _mine(rest[1]) and kind == "kill-in-save":
            kill_in_save(int(rest[0]))
        elif _mine(rest[1]) and kind in SIGNALS:
            callbacks.append(SignalInStep(int(rest[0]), SIGNALS[kind]))
        elif _mine(rest[1]) and kind == "stall":
            callbacks.append(StallInStep(int(rest[0]), 0))
    original = Trainer.__init__

    def init(self, config, *args, **kwargs):
        kwargs["callbacks"] = (*kwargs.get("callbacks", ()), *callbacks)
        original(self, config, *args, **kwargs)

    Trainer.__init__ = init


if __name__ == "__main__":
    argv = sys.argv[1:]
    install([a.split("=", 1)[1] for a in argv if a.startswith("--fault=")])
    sys.exit(main([a for a in argv if not a.startswith("--fault=")]))
