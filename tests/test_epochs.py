"""``train.epochs`` instead of ``train.max_steps``, and ``data.eval_split``: evaluation data held out of the
training data, deterministically from the seed."""
import math

import pytest

from collie import builders
from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.trainer import Trainer
from test_trainer import QUICKSTART, config

TRAIN_RECORDS = 4000  # data/quickstart/train.jsonl


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=2", "train.max_steps=10"], r"train.max_steps=10 and train.epochs=2 are alternatives"),
    (["train.epochs=0", "train.max_steps=null"], r"train.epochs=0 must be > 0"),
    (["data.eval_split=0.1"], r"data.eval_split and data.eval_files both name evaluation data"),
    (["data.eval_files=[]", "data.eval_split=1.5"], r"data.eval_split=1.5: give a fraction in \(0, 1\) or a whole"),
    (["data.eval_files=[]", "data.eval_split=0"], r"data.eval_split=0: give a fraction"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CollieConfig.load(QUICKSTART, overrides)


def test_max_steps_defaults_to_100_and_epochs_leave_it_open():
    assert CollieConfig().train.max_steps == 100
    assert CollieConfig.load(QUICKSTART, ["train.max_steps=null"]).train.max_steps == 100
    with pytest.raises(ConfigError, match="train.max_steps=1200 and train.epochs=1.5"):  # quickstart.yaml sets it
        CollieConfig.load(QUICKSTART, ["train.epochs=1.5"])
    cfg = CollieConfig.load(QUICKSTART, ["train.epochs=1.5", "train.max_steps=null"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (None, 1.5)


def test_epochs_become_steps_over_the_global_batch():
    cfg = CollieConfig.load(QUICKSTART, ["train.epochs=1.5", "train.max_steps=null", "train.micro_batch_size=8",
                                         "train.grad_accum_steps=3"])
    assert builders.resolve_max_steps(cfg, 1000, dp=2) == math.ceil(1.5 * 1000 / 48) == 32
    assert (cfg.train.max_steps, cfg.train.epochs) == (32, None)  # saved, it reloads as it ran
    CollieConfig.from_dict(cfg.to_dict())


def test_eval_split_is_a_deterministic_partition():
    cfg = CollieConfig.load(QUICKSTART, ["data.eval_files=[]", "data.eval_split=0.25"])
    data = list(range(40))
    train, held_out = builders.split_eval_data(cfg, data, None)
    assert len(held_out) == 10 and sorted([*train, *held_out]) == data
    assert list(builders.split_eval_data(cfg, data, None)[1]) == list(held_out)  # same seed, same split
    cfg.train.seed += 1
    assert list(builders.split_eval_data(cfg, data, None)[1]) != list(held_out)
    cfg.data.eval_split = 7.0  # a count
    assert len(builders.split_eval_data(cfg, data, None)[1]) == 7
    cfg.data.eval_split = 40.0
    with pytest.raises(ConfigError, match="holds out 40 of the 40 training samples"):
        builders.split_eval_data(cfg, data, None)


def test_trainer_runs_for_epochs_and_evaluates_the_held_out_split(tmp_path):
    cfg = config(tmp_path, "train.epochs=0.02", "train.max_steps=null", "train.micro_batch_size=16",
                 "data.eval_files=[]", "data.eval_split=0.05", "eval.metrics=[perplexity]",
                 "eval.before_training=false")
    trainer = Trainer(cfg)
    held_out = round(0.05 * TRAIN_RECORDS)
    assert (len(trainer.train_dataset), len(trainer.eval_dataset)) == (TRAIN_RECORDS - held_out, held_out)
    assert cfg.train.max_steps == math.ceil(0.02 * (TRAIN_RECORDS - held_out) / 16) == 5
    results = trainer.fit()
    assert trainer.state.step == 5 and results["tokens"] > 0
    log = (tmp_path / "train.log").read_text()
    assert "train.epochs=0.02: max_steps=5 (3800 training samples, global batch 16" in log
    assert "data.eval_split=0.05: 200 of 4000 training samples held out" in log
