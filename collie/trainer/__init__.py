"""The Trainer, its callbacks and checkpoints."""
from collie.callbacks import Callback
from collie.trainer.trainer import NonFiniteLossError, Trainer, TrainerState

__all__ = ["Callback", "NonFiniteLossError", "Trainer", "TrainerState"]
