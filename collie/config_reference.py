"""Generate the configuration reference (docs/configuration.md) from the config dataclasses.

    python -m collie.config_reference > docs/configuration.md

A test compares the file with this output, so the reference cannot drift from the code.
"""
import dataclasses
import typing

from collie.config import SECTIONS
from collie.models.args import ModelArgs


def _type_text(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_text(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {_type_text(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "null" if value is None else f"`{value}`"


def section_table(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        bounds = [f"{k} {f.metadata[k]}" for k in ("min", "max") if k in f.metadata]
        meaning = f.metadata.get("help", "") + (f" ({', '.join(bounds)})" if bounds else "")
        lines.append(f"| `{prefix}{f.name}` | {_type_text(hints[f.name])} | {_default_text(f)} | {meaning} |")
    return lines


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the dataclasses in `collie/config.py` and `collie/models/args.py` by "
             "`python -m collie.config_reference`; do not edit by hand.", "",
             "A job config is YAML with the sections below. Any key can be overridden on the command line: "
             "`collie train CONFIG train.max_steps=10 optim.lr=3e-4`. Unknown keys, wrong types, out-of-range "
             "values and impossible combinations fail at load time with the key's path.", ""]
    for name, cls in SECTIONS.items():
        lines += [f"## `{name}`", "", (cls.__doc__ or "").strip(), ""] + section_table(cls, f"{name}.") + [""]
    lines += ["## Model cards (`ModelArgs`)", "",
              "Cards in `models/*.yaml` hold these fields; `model.arch` overrides any of them.", ""]
    lines += section_table(ModelArgs, "") + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
