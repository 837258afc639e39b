"""collie: train Llama-family language models with 3D parallelism, LOMO/AdaLomo and PEFT.

The public surface: configs (``CollieConfig``), models (``from_pretrained``, ``build_model``,
``register_model``), optimizers (``register_optimizer``) and the ``Trainer`` with its ``Callback``s.
"""
from collie.config import CollieConfig
from collie.errors import CheckpointError, CollieError, ConfigError, DataError
from collie.models import ModelArgs, build_model, from_pretrained, register_model, save_pretrained
from collie.optim import register_optimizer
from collie.trainer import Callback, Trainer

__version__ = "0.1.0"
__all__ = ["Callback", "CheckpointError", "CollieConfig", "CollieError", "ConfigError", "DataError", "ModelArgs",
           "Trainer", "build_model", "from_pretrained", "register_model", "register_optimizer", "save_pretrained"]
