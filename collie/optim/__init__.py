"""Optimizer registry and collie's optimizers: adamw, lion, adan, sophia (classic ``step()``) and lomo,
adalomo (fused into backward, see ``collie.optim.fused``). Importing this package registers all of them."""
from collie.optim.registry import (build_optimizer, get_optimizer_factory, is_fused_optimizer, list_optimizers,
                                   register_optimizer, validate_optimizer_config)
from collie.optim.adalomo import AdaLomo
from collie.optim.adan import Adan
from collie.optim.fused import DynamicLossScaler, FusedOptimizer, FusedStepResult
from collie.optim.lion import Lion
from collie.optim.lomo import Lomo
from collie.optim.sophia import SophiaG, refresh_hessian, sophia_refresh_due

__all__ = ["AdaLomo", "Adan", "DynamicLossScaler", "FusedOptimizer", "FusedStepResult", "Lion", "Lomo", "SophiaG",
           "build_optimizer", "get_optimizer_factory", "is_fused_optimizer", "list_optimizers", "refresh_hessian", "register_optimizer",
           "sophia_refresh_due", "validate_optimizer_config"]
