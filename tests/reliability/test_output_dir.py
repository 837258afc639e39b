"""One run per output directory: a second run while the first holds the lock is refused naming its host and pid;
the lock goes away when its holder exits, and a dead holder's lock is taken over; a fresh run into a directory
with an earlier run's checkpoints is refused (nothing written) unless it resumes or sets train.overwrite=true."""
import json
import os
import socket
import subprocess
import sys

import pytest

from collie.cli import main
from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.trainer import Trainer
from reliability_helpers import QUICKSTART, ROOT, metric_rows, overrides

LOCK = ".collie.lock"


def config(out, *extra):
    return CollieConfig.load(QUICKSTART, overrides(out, "train.max_steps=2", "data.eval_files=[]",
                                                   "checkpoint.every_steps=1", *extra))


def holder(out, then: str) -> subprocess.Popen:
    """Another process that locks ``out``, says so, then runs ``then`` (Python)."""
    code = (f"import os, sys, time; sys.path.insert(0, {ROOT!r}); from collie.checkpoint import OutputDirLock; "
            f"OutputDirLock({str(out)!r}).acquire(); print('locked', flush=True); {then}")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    first = holder(out, "time.sleep(120)")
    try:
        pattern = f"in use by another run \\(host {socket.gethostname()}, pid {first.pid}, since "
        with pytest.raises(ConfigError, match=pattern):
            Trainer(config(out))
        assert main(["train", QUICKSTART, *overrides(out, "train.max_steps=1")]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        assert not (out / "config.yaml").exists()
    finally:
        first.kill()  # dies holding the lock (SIGKILL: no cleanup)
        first.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == first.pid
    trainer = Trainer(config(out, "train.max_steps=1"))  # the stale lock is taken over
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    trainer.output_lock.release()
    assert not (out / LOCK).exists()


def test_the_lock_is_released_when_its_holder_exits(tmp_path):
    first = holder(tmp_path, "sys.exit(0)")
    assert first.wait(timeout=60) == 0
    assert not (tmp_path / LOCK).exists()


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path):
    Trainer(config(tmp_path, "train.max_steps=3")).fit()
    config_yaml = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run .*step-00000003.*train.overwrite=true"):
        Trainer(config(tmp_path, "optim.lr=1e-4"))
    assert (tmp_path / "config.yaml").read_text() == config_yaml  # nothing written
    assert Trainer(config(tmp_path, "train.max_steps=3", "checkpoint.resume=auto")).state.step == 3
    Trainer(config(tmp_path, "optim.lr=1e-4", "train.overwrite=true")).fit()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001", "step-00000002"]
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2] and metric_rows(tmp_path)[0]["lr"] == 1e-4
