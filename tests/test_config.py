"""The job configuration: every shipped config loads; bad input fails at load time naming the key."""
import glob
import os

import pytest

from collie.config import CollieConfig
from collie.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"data": {"train_files": ["data/quickstart/train.jsonl"]}}


def load(data, overrides=()):
    return CollieConfig.from_dict(data, list(overrides))


# configs/bench/ holds benchmark grids, not job configs; tests/test_bench.py loads and validates them.
JOB_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                     if not p.startswith(os.path.join(ROOT, "configs", "bench") + os.sep))


@pytest.mark.parametrize("path", JOB_CONFIGS)
def test_every_shipped_config_loads(path):
    cfg = CollieConfig.load(path)
    assert cfg.train.max_steps >= 1


def test_defaults_and_overrides():
    cfg = load(BASE, ["train.max_steps=7", "optim.lr=3e-4", "eval.metrics=[perplexity]", "model.arch.num_hidden_layers=2"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.arch == {"num_hidden_layers": 2}
    assert cfg.parallel.tp == 1 and cfg.optim.name == "adamw"


def test_round_trip_through_yaml(tmp_path):
    cfg = load(BASE, ["train.seed=3"])
    cfg.save(tmp_path / "c.yaml")
    assert CollieConfig.load(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize("data, overrides, message", [
    ({**BASE, "trian": {}}, [], "unknown key 'trian' (did you mean 'train'?)"),
    (BASE, ["train.max_step=3"], "unknown key 'train.max_step' (did you mean 'max_steps'?)"),
    (BASE, ["train.max_steps=abc"], "train.max_steps: expected int, got str"),
    (BASE, ["train.max_steps=0"], "train.max_steps=0 is out of range: must be >= 1"),
    (BASE, ["optim.lr=-1"], "optim.lr=-1.0 is out of range"),
    (BASE, ["train.precision=fp8"], "train.precision='fp8' is not a valid choice"),
    (BASE, ["parallel.zero_stage=4"], "parallel.zero_stage=4 is out of range: must be <= 3"),
    (BASE, ["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tp > 1"),
    (BASE, ["parallel.pp=2", "parallel.pp_boundaries=[1, 2]"], "parallel.pp_boundaries has 2 entries"),
    (BASE, ["optim.name=adamx"], "optim.name='adamx' is not a registered optimizer (did you mean 'adamw'?)"),
    (BASE, ["optim.args={beta: [0.9, 0.95]}"], "optim.args.beta is not a hyper-parameter of 'adamw' (did you mean 'betas'?)"),
    (BASE, ["optim.args={lr: 1}"], "set it as optim.lr"),
    (BASE, ["model.arch={hiden_size: 8}"], "unknown key 'model.arch.hiden_size' (did you mean 'hidden_size'?)"),
    (BASE, ["monitor.sinks=[jsonl, tensorbord]"], "monitor.sinks[1]='tensorbord' is unknown (did you mean 'tensorboard'?)"),
    (BASE, ["eval.metrics=[acc]"], "eval.metrics[0]='acc' is unknown"),
    ({}, [], "data.train_files is empty"),
    (BASE, ["trainmax_steps=1"], "unknown section 'trainmax_steps'"),
    (BASE, ["train.max_steps"], "must look like section.key=value"),
    ({**BASE, "train": 5}, [], "train: expected a mapping of TrainConfig fields, got int"),
])
def test_bad_config_names_the_key(data, overrides, message):
    with pytest.raises(ConfigError) as err:
        load(data, overrides)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CollieConfig.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CollieConfig.load(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        CollieConfig.load(str(bad))
