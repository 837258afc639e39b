"""Everything a run writes goes under train.output_dir: a 2-rank job in a fresh working directory, with HOME,
TMPDIR and XDG_CACHE_HOME pointing at empty directories, leaves new files only under its output directory."""
import os
import subprocess
import sys

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


def test_a_pretraining_run_caches_its_tokens_under_its_output_directory(tmp_path, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sample = os.path.join(root, "data", "pretrain_sample")
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir(), home.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    subprocess.run([sys.executable, "-m", "collie", "train", os.path.join(root, "configs", "pretrain_tiny.yaml"),
                    "train.max_steps=2", "train.output_dir=runs/pre", "train.progress_bar=false",
                    f"data.train_files=[{sample}/train.txt]", f"data.eval_files=[{sample}/eval.txt]",
                    f"data.tokenizer={sample}/tokenizer.model", "eval.max_batches=1"],
                   cwd=cwd, env=env, check=True, capture_output=True, timeout=180)
    assert tree(home) == set()
    assert all(path.startswith(os.path.join("runs", "pre") + os.sep) for path in tree(cwd))
    assert any(path.startswith(os.path.join("runs", "pre", "data_cache")) for path in tree(cwd))
