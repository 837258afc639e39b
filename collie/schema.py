"""Typed dataclasses from plain dicts (YAML), with errors that name the key path.

Every configuration object in collie (job config sections, model cards) is a dataclass whose fields carry
their documentation and bounds in ``field(metadata=...)``:

    lr: float = field(default=1e-3, metadata={"help": "peak learning rate", "min": 0.0})

``from_dict`` checks keys (with a "did you mean" suggestion), types (``Literal`` choices, ``Optional``,
``list[...]``, ``dict``, nested dataclasses) and the ``min``/``max`` bounds (``greater_than``: an exclusive
lower bound). Floats must be finite: YAML's ``.nan`` and ``.inf`` are refused wherever a number is expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from collie.errors import ConfigError

INT64_MAX = 2**63 - 1


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(cls, data: dict | None, path: str = ""):
    """Build dataclass ``cls`` from ``data``, validating every key; ``path`` prefixes key names in errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping of {cls.__name__} fields, got {_type_name(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{_join(path, key)}'{suggest(key, fields)}; "
                              f"valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {name: coerce(hints[name], data[name], _join(path, name), fields[name].metadata)
              for name in fields if name in data}
    return cls(**values)


def coerce(tp, value: Any, path: str, metadata=None):
    """Check ``value`` against the annotation ``tp`` (converting int→float and YAML lists), or raise."""
    value = _coerce_type(tp, value, path)
    metadata = metadata or {}
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        raise ConfigError(f"{path}={value} is out of range: integers must fit in 64 bits (|value| <= {INT64_MAX})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "greater_than" in metadata and not value > metadata["greater_than"]:
            raise ConfigError(f"{path}={value} is out of range: must be > {metadata['greater_than']}")
        if "min" in metadata and value < metadata["min"]:
            raise ConfigError(f"{path}={value} is out of range: must be >= {metadata['min']}")
        if "max" in metadata and value > metadata["max"]:
            raise ConfigError(f"{path}={value} is out of range: must be <= {metadata['max']}")
    return value


def _coerce_type(tp, value, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce_type(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_type_name(value)} {value!r} "
                          f"matches none of {', '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not a valid choice{suggest(value, args)}; "
                              f"choose one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_type_name(value)} {value!r}")
        inner = args[0] if args else Any
        return [_coerce_type(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_type_name(value)} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            value = _parse_float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return finite_float(value, path)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {_type_name(value)} {value!r}")


def finite_float(value, path: str) -> float:
    """``value`` as a float; NaN, ±inf and ints too large for a float are a ConfigError naming ``path``."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{path}={value!r} is not a finite number; give a finite value (not .nan or .inf)")
    return number


def _parse_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def to_dict(obj) -> dict:
    """The dataclass as plain data (for YAML dumps)."""
    return dataclasses.asdict(obj)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
