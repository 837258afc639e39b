"""Optimizers by name. ``@register_optimizer("name")`` adds one from user code without touching collie.

A registered entry is a callable ``factory(params, lr=..., weight_decay=..., **args) -> Optimizer`` (an
optimizer class works as is). ``optim.args`` in the config is checked against the factory's signature at
config load, so a hyper-parameter the optimizer does not take fails before any process starts. A factory
that declares ``clip_grad_norm`` / ``clip_grad_value`` (fused optimizers clip inside backward) receives
``optim.clip_grad_norm`` / ``optim.clip_grad_value``. ``register_optimizer(name, validate=fn)`` adds a
config-load check ``fn(cfg)`` for combinations the optimizer cannot run with.

``build_optimizer`` hands every factory torch param groups (``collie.optim.param_groups``): ``decay`` and
``no_decay`` (weight decay 0 for the kinds in ``optim.no_decay``), so a factory must pass ``params`` on to a
``torch.optim.Optimizer`` as it is rather than treat it as a list of tensors.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from collie.errors import ConfigError
from collie.optim.param_groups import NO_DECAY_KINDS, param_groups
from collie.schema import suggest

_OPTIMIZERS: dict[str, Callable] = {}
_VALIDATORS: dict[str, Callable] = {}
_FUSED: set[str] = set()
# keys set as optim.<key>, never inside optim.args; the clip keys reach factories that declare them
_SECTION_KEYS = ("lr", "weight_decay", "clip_grad_norm", "clip_grad_value", "no_decay")


def register_optimizer(name: str, validate: Callable | None = None, fused: bool = False):
    """Class/function decorator registering an optimizer factory under ``name``; ``validate(cfg)`` raises
    ConfigError for configurations the optimizer cannot support; ``fused``: it updates inside backward
    (a ``collie.optim.FusedOptimizer``)."""
    def wrap(factory):
        _OPTIMIZERS[name] = factory
        (_FUSED.add if fused or getattr(factory, "fused_backward", False) else _FUSED.discard)(name)
        if validate is not None:
            _VALIDATORS[name] = validate
        else:
            _VALIDATORS.pop(name, None)
        return factory
    return wrap


def list_optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def get_optimizer_factory(name: str) -> Callable:
    if name not in _OPTIMIZERS:
        raise ConfigError(f"optim.name='{name}' is not a registered optimizer{suggest(name, _OPTIMIZERS)}; "
                          f"registered: {', '.join(list_optimizers())}")
    return _OPTIMIZERS[name]


def is_fused_optimizer(name: str) -> bool:
    """Whether the optimizer registered as ``name`` updates inside backward (LOMO, AdaLomo)."""
    get_optimizer_factory(name)
    return name in _FUSED


def accepted_args(factory: Callable) -> set[str] | None:
    """Keyword names the factory takes (None when it takes ``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "params"}


def validate_optimizer_config(cfg) -> None:
    """Config-load check: the name is registered, every key of ``optim.args`` is accepted, and the optimizer's
    own ``validate`` (if any) accepts the whole configuration."""
    factory = get_optimizer_factory(cfg.optim.name)
    unknown = [kind for kind in cfg.optim.no_decay if kind not in NO_DECAY_KINDS]
    if unknown:
        raise ConfigError(f"optim.no_decay: unknown kind {unknown[0]!r}{suggest(unknown[0], NO_DECAY_KINDS)}; "
                          f"choose from {', '.join(NO_DECAY_KINDS)}")
    allowed = accepted_args(factory)
    for key in cfg.optim.args:
        if key in _SECTION_KEYS:
            raise ConfigError(f"optim.args.{key}: set it as optim.{key}, not inside optim.args")
        if allowed is not None and key not in allowed:
            valid = sorted(allowed - set(_SECTION_KEYS))
            raise ConfigError(f"optim.args.{key} is not a hyper-parameter of '{cfg.optim.name}'"
                              f"{suggest(key, valid)}; it takes: {', '.join(valid)}")
    _coerce_args(cfg, factory)
    if cfg.optim.name in _VALIDATORS:
        _VALIDATORS[cfg.optim.name](cfg)


def _coerce_args(cfg, factory: Callable) -> None:
    """Convert ``optim.args`` values to the type of the factory's default, in place (YAML 1.1 reads ``1e-8``
    as a string), so that a wrong value fails at load time with its key."""
    defaults = {p.name: p.default for p in inspect.signature(factory).parameters.values()
                if p.default is not inspect.Parameter.empty}
    for key, value in cfg.optim.args.items():
        default = defaults.get(key)
        try:
            cfg.optim.args[key] = _like(default, value)
        except (TypeError, ValueError):
            raise ConfigError(f"optim.args.{key}={value!r}: expected a value like {default!r}") from None


def _like(default, value):
    """``value`` converted to the type of ``default`` (bool, int, float; a tuple default gives a list, which YAML
    can save); values of parameters with other defaults are left as they are."""
    if not isinstance(default, (bool, int, float, tuple)):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if type(value) is not type(default):
            raise TypeError(value)
        return value
    if isinstance(default, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise TypeError(value)
        return [_like(d, v) for d, v in zip(default, value)]
    return value


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optim`` over ``params``: ``(name, parameter)`` pairs (``named_parameters()`` of
    the model or of this rank's pipeline stages, trainable ones only) are split into the ``decay`` and
    ``no_decay`` groups of ``optim.no_decay``; plain parameters (no names) make one group with
    ``optim.weight_decay``."""
    factory = get_optimizer_factory(cfg.optim.name)
    declared = accepted_args(factory) or set()
    clipping = {key: getattr(cfg.optim, key) for key in ("clip_grad_norm", "clip_grad_value") if key in declared}
    params = list(params)
    if params and isinstance(params[0], tuple):
        params = param_groups(params, cfg.optim.no_decay, cfg.optim.weight_decay)
    return factory(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **clipping, **cfg.optim.args)


@register_optimizer("adamw")
def adamw(params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
          fused: bool | None = None):
    """torch AdamW; fused kernel on CUDA, foreach elsewhere."""
    params = list(params)
    if fused is None:
        tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        fused = all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                             fused=fused, foreach=None if fused else True)
