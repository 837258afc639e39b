"""Everything a run writes goes under train.output_dir: a 2-rank job in a fresh working directory, with HOME,
TMPDIR and XDG_CACHE_HOME pointing at empty directories, leaves new files only under its output directory."""
import os

import pytest

from collie.distributed.launch import run_distributed
from reliability_helpers import WORKER, worker_args

pytestmark = pytest.mark.distributed


def tree(root) -> set[str]:
    found = set()
    for directory, _, files in os.walk(root):
        found.update(os.path.relpath(os.path.join(directory, f), root) for f in files)
    return found


def test_a_run_writes_only_under_its_output_directory(tmp_path, monkeypatch):
    cwd, home, tmp = (tmp_path / name for name in ("cwd", "home", "tmp"))
    for directory in (cwd, home, tmp):
        directory.mkdir()
    (cwd / "notes.txt").write_text("the user's own file")
    monkeypatch.chdir(cwd)
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": str(home / ".cache")}
    before = {root: tree(root) for root in (cwd, home, tmp)}
    run_distributed(WORKER, 2, worker_args("runs/job", "parallel.dp=2", "train.max_steps=4", "checkpoint.every_steps=2",
                                           "eval.every_steps=2", "checkpoint.save_final=true",
                                           "monitor.sinks=[jsonl, csv]", dp=2), env=env, timeout_s=180)
    new = {root: tree(root) - before[root] for root in (cwd, home, tmp)}
    assert new[home] == set() and new[tmp] == set(), new
    assert new[cwd] and all(path.startswith(os.path.join("runs", "job") + os.sep) for path in new[cwd]), new[cwd]
    written = {path.split(os.sep)[2] for path in new[cwd]}
    assert {"config.yaml", "train.log", "metrics.jsonl", "checkpoints", "final"} <= written, written
