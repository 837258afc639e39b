"""A benchmark grid: one base job config and named override sets, each run as its own process group.

    base: ../quickstart.yaml          # job config; relative paths are relative to this file
    warmup_steps: 2                   # steps run but not timed
    steps: 5                          # timed steps (median reported)
    overrides: [eval.metrics=[perplexity]]          # applied to every configuration
    axes:                             # the cross product of the axes' options …
      - [{name: dp1, nproc: 1}, {name: dp2, nproc: 2, overrides: [parallel.dp=2]}]
      - [{name: adamw}, {name: lion, overrides: [optim.name=lion, optim.lr=3e-4]}]
    configs:                          # … and/or explicit configurations
      - {name: lora-r8, overrides: [peft.method=lora, peft.r=8]}
    baselines:                        # reference steps outside collie (collie/bench/baseline.py)
      - {name: hf-adamw, kind: hf_adamw, against: [adamw]}   # mirrors configuration adamw; ratios for each

A product's name joins its options' names with '/'. Every configuration is validated as a ``CollieConfig``
when the grid loads, so a typo fails before anything runs.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Optional


from collie.config import CollieConfig, read_yaml
from collie.errors import ConfigError
from collie.schema import from_dict


@dataclass
class BenchOption:
    """One option of an axis, or one explicit configuration."""
    name: str = ""
    nproc: Optional[int] = field(default=None, metadata={"min": 1})
    overrides: list[str] = field(default_factory=list)


@dataclass
class BaselineOption:
    """A baseline as written: its name, kind (``collie.bench.baseline.KINDS``) and the configurations it is the
    reference of (the first one's model, batch and hyper-parameters are mirrored)."""
    name: str = ""
    kind: str = ""
    against: list[str] = field(default_factory=list)


@dataclass
class BenchGridFile:
    """The YAML file, as written."""
    base: str = ""
    warmup_steps: int = field(default=2, metadata={"min": 0})
    steps: int = field(default=5, metadata={"min": 1})
    nproc: int = field(default=1, metadata={"min": 1})
    threads_per_rank: int = field(default=1, metadata={"min": 1})
    timeout_s: int = field(default=1800, metadata={"min": 1})
    overrides: list[str] = field(default_factory=list)
    axes: list[list[BenchOption]] = field(default_factory=list)
    configs: list[BenchOption] = field(default_factory=list)
    baselines: list[BaselineOption] = field(default_factory=list)


@dataclass
class NamedRun:
    """A run of the grid, under its name; ``slug`` names its output directory."""
    name: str

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass
class BenchRun(NamedRun):
    """One configuration to run: ``collie train base *overrides`` on ``nproc`` ranks."""
    nproc: int
    base: str
    overrides: list[str]
    config: CollieConfig

    def layout(self) -> str:
        p = self.config.parallel
        dp = p.dp if p.dp > 0 else self.nproc // (p.tp * p.pp)
        return f"dp{dp} tp{p.tp} pp{p.pp} zero{p.zero_stage}"


@dataclass
class BaselineRun(NamedRun):
    """A baseline to run: ``kind`` on the setting of ``mirror``, compared with the runs named in ``against``."""
    kind: str
    against: list[str]
    mirror: BenchRun


def slug(name: str) -> str:
    """A configuration's name as a directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass
class BenchGrid:
    path: str
    warmup_steps: int
    steps: int
    threads_per_rank: int
    timeout_s: int
    runs: list[BenchRun]
    baselines: list[BaselineRun] = field(default_factory=list)


def load_grid(path: str, extra_overrides=(), only=None, steps: int | None = None,
              warmup_steps: int | None = None) -> BenchGrid:
    """Read a grid file and validate each configuration (with ``extra_overrides`` applied last).

    ``only`` keeps the named configurations; ``steps``/``warmup_steps`` replace the file's values.
    """
    spec = _read(path)
    base = _resolve_base(path, spec.base)
    steps = spec.steps if steps is None else steps
    warmup_steps = spec.warmup_steps if warmup_steps is None else warmup_steps
    options = _expand(path, spec)
    names = [name for name, _, _ in options]
    for name in only or ():
        if name not in names:
            raise ConfigError(f"{path}: no configuration named '{name}'; the grid has: {', '.join(names)}")
    runs = [_validate(path, name, nproc or spec.nproc, base, [*spec.overrides, *overrides, *extra_overrides],
                      warmup_steps + steps)
            for name, nproc, overrides in options if not only or name in only]
    baselines = _baselines(path, spec.baselines, names, runs)
    return BenchGrid(path, warmup_steps, steps, spec.threads_per_rank, spec.timeout_s, runs, baselines)


def _baselines(path: str, options: list[BaselineOption], names: list[str], runs: list[BenchRun]) -> list[BaselineRun]:
    """The baselines of the selected runs, each checked against the configuration it mirrors."""
    from collie.bench.baseline import KINDS, check_supported
    selected, baselines = {run.name: run for run in runs}, []
    for option in options:
        where = f"{path}: baseline '{option.name}'"
        if not option.name or option.name in names:
            raise ConfigError(f"{where}: a baseline needs a name of its own (configurations: {', '.join(names)})")
        if option.kind not in KINDS:
            raise ConfigError(f"{where}: kind {option.kind!r} is unknown; choose from {', '.join(KINDS)}")
        unknown = [name for name in option.against if name not in names]
        if not option.against or unknown:
            raise ConfigError(f"{where}: 'against' must name configurations of the grid ({', '.join(names)}); "
                              f"got {option.against}")
        against = [name for name in option.against if name in selected]
        if not against:  # --only left out every configuration it is the reference of
            continue
        try:
            check_supported(option.kind, selected[against[0]].config)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        baselines.append(BaselineRun(option.name, option.kind, against, selected[against[0]]))
    return baselines


def _read(path: str) -> BenchGridFile:
    data = read_yaml(path, "bench grid file", "grid keys (base, steps, axes, configs, …)")
    try:
        spec = from_dict(BenchGridFile, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not spec.base:
        raise ConfigError(f"{path}: 'base' is missing: name the job config the grid varies, e.g. "
                          f"base: ../quickstart.yaml")
    if not spec.axes and not spec.configs:
        raise ConfigError(f"{path}: the grid is empty; list configurations under 'configs' or options under 'axes'")
    return spec


def _resolve_base(path: str, base: str) -> str:
    resolved = base if os.path.isabs(base) else os.path.normpath(os.path.join(os.path.dirname(path), base))
    if not os.path.isfile(resolved):
        raise ConfigError(f"{path}: base '{base}' not found (looked for {resolved}; relative paths are relative "
                          f"to the grid file)")
    return resolved


def _expand(path: str, spec: BenchGridFile) -> list[tuple[str, int | None, list[str]]]:
    """(name, nproc, overrides) of every configuration: the axes' product, then the explicit ones."""
    combos = []
    for index, axis in enumerate(spec.axes):
        if not axis:
            raise ConfigError(f"{path}: axes[{index}] has no options")
    for picks in itertools.product(*spec.axes) if spec.axes else ():
        nprocs = {o.nproc for o in picks if o.nproc is not None}
        name = "/".join(o.name for o in picks)
        if len(nprocs) > 1:
            raise ConfigError(f"{path}: options of '{name}' ask for different nproc {sorted(nprocs)}; set nproc "
                              f"on one axis only")
        combos.append((name, nprocs.pop() if nprocs else None, [x for o in picks for x in o.overrides]))
    combos += [(o.name, o.nproc, list(o.overrides)) for o in spec.configs]
    seen = set()
    for name, _, _ in combos:
        if not name:
            raise ConfigError(f"{path}: every option and configuration needs a 'name'")
        if name in seen:
            raise ConfigError(f"{path}: configuration name '{name}' appears twice; names must be unique")
        seen.add(name)
    return combos


def _validate(path, name, nproc, base, overrides, max_steps) -> BenchRun:
    try:
        config = CollieConfig.load(base, [*overrides, f"train.max_steps={max_steps}"])
    except ConfigError as error:
        raise ConfigError(f"{path}: configuration '{name}': {error}") from None
    p = config.parallel
    ranks_per_replica = p.tp * p.pp
    if (p.dp > 0 and p.dp * ranks_per_replica != nproc) or nproc % ranks_per_replica:
        raise ConfigError(f"{path}: configuration '{name}' runs on nproc={nproc} ranks but asks for "
                          f"dp={p.dp} × tp={p.tp} × pp={p.pp}; set nproc to their product (dp=-1 fills the rest)")
    return BenchRun(name, nproc, base, overrides, config)
