"""Config fuzzing: seeded mutations of the shipped configs (unknown keys, wrong types, out-of-range sizes, NaN and
infinite numbers, impossible layouts, incompatible optimizer/PEFT/layout pairs) must each end in a ConfigError whose message names
the mutated key's dotted path — from the checks collie runs before any process group or model exists.
"""
import copy
import dataclasses
import glob
import os
import random
import typing
from typing import Literal

import pytest
import yaml

from collie.config import SECTIONS, CollieConfig
from collie.distributed.mesh import resolve_degrees, validate_model_for_layout
from collie.errors import ConfigError
from collie.builders import build_model_args
from reliability_helpers import ROOT

SEED, PER_FAMILY = 20261129, 40
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
WRONG = {int: ["eight", 2.5, [1], {"a": 1}, True], float: ["fast", [0.1], {"x": 1}, True], bool: ["yes", 2, [True]],
         str: [12, [1, 2], {"k": "v"}, 1.5], list: ["not-a-list", 3, {"a": 1}], dict: ["not-a-map", [1, 2], 7]}
# (overrides, key the message must name): combinations only the cross-section checks can reject, each applied
# leaf by leaf to every shipped config after RESET (a one-dimensional layout, no PEFT, a classic optimizer, no
# checkpointing, no router losses, untied embeddings, head_dim from the hidden size, 4 layers, a micro-batch
# pipelines can split), so that it is the only fault; world size 4
RESET = {"parallel": {"dp": -1, "tp": 1, "pp": 1, "cp": 1, "ep": 1, "dp_replicate": 1, "zero_stage": 0,
                      "sequence_parallel": False},
         "peft": {"method": "none"}, "eval": {"metrics": ["perplexity"]}, "data": {"document_masking": False},
         "optim": {"name": "adamw", "args": {}}, "train": {"micro_batch_size": 8},
         "model": {"activation_checkpointing": "none", "arch.router_aux_loss_coef": 0.0,
                   "arch.router_z_loss_coef": 0.0, "arch.tie_word_embeddings": False, "arch.head_dim": None,
                   "arch.num_hidden_layers": 4}}
INCOMPATIBLE = [
    ({"optim": {"name": "lomo"}, "parallel": {"pp": 2}}, "parallel.pp"),
    ({"optim": {"name": "adalomo"}, "parallel": {"zero_stage": 1}}, "parallel.zero_stage"),
    ({"optim": {"name": "lomo"}, "parallel": {"engine": "deepspeed"}}, "parallel.engine"),
    ({"optim": {"name": "adamw", "args": {"momentum": 0.9}}}, "optim.args.momentum"),
    ({"optim": {"name": "adamw", "args": {"lr": 0.1}}}, "optim.args.lr"),
    ({"optim": {"name": "adamw", "args": {"betas": "fast"}}}, "optim.args.betas"),
    ({"optim": {"name": "adamw2"}}, "optim.name"),
    ({"optim": {"name": "sgdd"}}, "optim.name"),
    ({"peft": {"method": "prefix"}, "parallel": {"dp": 2}}, "parallel.dp"),
    ({"peft": {"method": "prompt"}, "data": {"pack": True}}, "data.pack"),
    ({"peft": {"method": "ia3"}, "model": {"activation_checkpointing": "full"}}, "model.activation_checkpointing"),
    ({"peft": {"method": "lora", "target_modules": ["qq_proj"]}}, "peft.target_modules"),
    ({"peft": {"method": "lora", "target_modules": []}}, "peft.target_modules"),
    ({"parallel": {"tp": 3}}, "parallel.tp"),
    ({"parallel": {"tp": 8}}, "parallel.tp"),
    ({"parallel": {"tp": 4, "dp": 1}, "model": {"arch": {"intermediate_size": 346}}}, "parallel.tp"),
    ({"parallel": {"dp": 3}}, "parallel.dp"),
    ({"parallel": {"dp": 0}}, "parallel.dp"),
    ({"parallel": {"pp": 4, "dp": 1, "pp_schedule": "interleaved_1f1b"}}, "parallel.pp"),
    ({"parallel": {"pp": 2, "pp_boundaries": [1, 2]}}, "parallel.pp_boundaries"),
    ({"parallel": {"pp": 2, "pp_boundaries": [0]}}, "parallel.pp_boundaries"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel"),
    ({"parallel": {"pp": 2, "pp_microbatches": 3}}, "parallel.pp_microbatches"),
    ({"parallel": {"pp": 2}, "model": {"arch": {"tie_word_embeddings": True}}}, "tie_word_embeddings"),
    ({"parallel": {"pp": 2}, "eval": {"metrics": ["multiple_choice"], "choice_file": "choices.jsonl"}},
     "eval.metrics"),
    ({"eval": {"metrics": ["exact_match"]}, "data": {"format": "pretrain"}}, "eval.metrics"),
    ({"data": {"train_files": []}}, "data.train_files"),
    ({"data": {"document_masking": True, "format": "instruction", "pack": False}}, "data.document_masking"),
    ({"eval": {"metrics": ["bleu_score"]}}, "eval.metrics"),
    ({"monitor": {"sinks": ["slack"]}}, "monitor.sinks"),
    ({"model": {"card": "tiny-xl"}}, "model.card"),
    ({"model": {"arch": {"hidden_sise": 64}}}, "model.arch.hidden_sise"),
    ({"model": {"arch": {"hidden_size": "wide"}}}, "model.arch.hidden_size"),
    ({"model": {"arch": {"hidden_size": 100}}}, "model.arch"),
    ({"model": {"arch": {"num_key_value_heads": 3}}}, "model.arch"),
]


def pre_start_checks(data: dict, world: int = 4) -> None:
    """What a launch checks before it starts a process group or builds anything (Trainer.__init__ order)."""
    cfg = CollieConfig.from_dict(data)
    _, tp, pp = resolve_degrees(cfg.parallel, world)
    validate_model_for_layout(build_model_args(cfg.model), cfg.parallel, tp, pp)


def leaf_fields():
    """(section, field name, annotation, metadata) of every config field."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f.name, hints[f.name], f.metadata


def base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union or (args and typing.get_origin(tp) not in (list, dict, Literal)):
        return base_type(args[0])
    return typing.get_origin(tp) or tp


def leaves(values: dict, prefix: str = ""):
    """(dotted key, value) of every non-dict value below ``values``: a mutation merges into the config."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_key(data: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def typo(name: str, rng: random.Random) -> str:
    i = rng.randrange(len(name))
    return name[:i] + rng.choice("xqz") + name[i + 1:] if rng.random() < 0.5 else name + "_" + rng.choice(["x", "v2"])


def mutations(seed: int = SEED):
    """(description, config dict, dotted key the error must name), deterministic for a seed."""
    rng = random.Random(seed)
    bases = {os.path.basename(p): yaml.safe_load(open(p)) for p in CONFIGS}
    fields = list(leaf_fields())
    out = []

    def base():
        name = rng.choice(sorted(bases))
        return name, yaml.safe_load(yaml.safe_dump(bases[name]))

    for _ in range(PER_FAMILY):  # unknown keys, in a section, at the top level and in model.arch
        name, data = base()
        section, field, _, _ = rng.choice(fields)
        key = typo(field, rng)
        if key not in dict(zip((f[1] for f in fields if f[0] == section), range(999))):
            out.append((f"{name}: unknown {section}.{key}", set_key(data, f"{section}.{key}", 1), f"{section}.{key}"))
        top = typo(rng.choice(sorted(SECTIONS)), rng)
        out.append((f"{name}: unknown section {top}", {**base()[1], top: {}}, top))
    for _ in range(PER_FAMILY * 2):  # wrong types
        name, data = base()
        section, field, tp, _ = rng.choice(fields)
        kind = base_type(tp)
        if kind is Literal:
            value = rng.choice(["bogus", 3, ["a"]])
        else:
            value = rng.choice(WRONG[kind])
        out.append((f"{name}: {section}.{field}={value!r}", set_key(data, f"{section}.{field}", value),
                    f"{section}.{field}"))
    bounded = [f for f in fields if "min" in f[3] or "max" in f[3]]
    for _ in range(PER_FAMILY):  # negative sizes and out-of-range values
        name, data = base()
        section, field, tp, meta = rng.choice(bounded)
        integer = base_type(tp) is int
        if "max" in meta and rng.random() < 0.3:
            value = meta["max"] + (1 if integer else 0.5)
        elif "min" in meta:
            value = meta["min"] - rng.choice([1, 5, 1000]) if integer else meta["min"] - rng.choice([0.5, 1e9])
        else:
            value = meta["max"] + 1
        out.append((f"{name}: {section}.{field}={value!r}", set_key(data, f"{section}.{field}", value),
                    f"{section}.{field}"))
    for section, field, tp, _ in fields:  # non-finite numbers: every float field, .nan and .inf
        if base_type(tp) is float:
            for value in (float("nan"), float("inf")):
                name, data = base()
                out.append((f"{name}: {section}.{field}={value!r}", set_key(data, f"{section}.{field}", value),
                            f"{section}.{field}"))
    for overrides, key in INCOMPATIBLE:  # layouts and pairs, on every shipped config
        for name in sorted(bases):
            data = yaml.safe_load(yaml.safe_dump(bases[name]))
            for section, values in [*RESET.items(), *overrides.items()]:
                for k, v in leaves(values):
                    set_key(data, f"{section}.{k}", copy.deepcopy(v))  # RESET's values are shared by all cases
            out.append((f"{name}: {overrides}", data, key))
    return out


CASES = mutations()


def test_the_corpus_is_large_and_deterministic():
    assert len(CASES) >= 200
    assert [c[0] for c in mutations()] == [c[0] for c in CASES]


@pytest.mark.parametrize("index", range(0, len(CASES), 25))
def test_bad_configs_fail_with_a_config_error_naming_the_key(index):
    failures = []
    for description, data, key in CASES[index:index + 25]:
        try:
            pre_start_checks(data)
            failures.append(f"{description}: accepted")
        except ConfigError as e:
            if key not in str(e):
                failures.append(f"{description}: message does not name {key}: {e}")
        except Exception as e:  # noqa: BLE001 — anything else is a deep traceback for the user
            failures.append(f"{description}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_the_shipped_configs_pass_the_same_checks():
    for path in CONFIGS:
        pre_start_checks(yaml.safe_load(open(path)))


def test_the_command_line_reports_them_without_a_traceback_or_a_run(tmp_path, capsys, monkeypatch):
    """Every 10th mutation through ``collie train`` in one process: exit code 2, one error line, no run dir."""
    from collie.cli import main
    monkeypatch.chdir(tmp_path)
    for index in range(0, len(CASES), 10):
        description, data, _ = CASES[index]
        data = yaml.safe_load(yaml.safe_dump(data))
        if isinstance(data.get("train"), dict) and "output_dir" not in data["train"]:
            data["train"]["output_dir"] = str(tmp_path / "run")
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["train", str(path)]) == 2, description
        err = capsys.readouterr().err
        assert err.startswith("collie: error: ConfigError: ") and "Traceback" not in err, description
        assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists(), description
