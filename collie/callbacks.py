"""Callbacks: the Trainer fires events, monitors, evaluators and user code react to them.

Subclass ``Callback`` and override what you need; every hook receives the trainer, whose ``state`` holds the
step counter and the latest metrics.
"""
from __future__ import annotations


class Callback:
    def on_train_begin(self, trainer) -> None: ...
    def on_step_begin(self, trainer) -> None: ...
    def on_step_end(self, trainer, metrics: dict) -> None: ...
    def on_log(self, trainer, metrics: dict) -> None: ...
    def on_evaluate(self, trainer, results: dict) -> None: ...
    def on_save(self, trainer, path: str) -> None: ...
    def on_train_end(self, trainer) -> None: ...


class CallbackList:
    """The trainer's callbacks, called in order for each event."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def fire(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)
