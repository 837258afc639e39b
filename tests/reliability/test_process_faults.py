"""Faults injected into 2-rank gloo jobs of the real ``collie train`` (through fault_worker.py): a rank killed while
writing a checkpoint, SIGTERM (preemption) mid-step, a rank killed mid-step. After each, a second launch with
``checkpoint.resume=auto`` must continue to the same per-step losses and token counts as an uninterrupted
one-process run: no repeated or skipped samples, no lost or double optimizer steps.
"""
import os
import subprocess
import sys
import time

import pytest

from collie.config import CollieConfig
from collie.distributed.launch import DistributedRunError, free_port, run_distributed
from collie.trainer import Trainer
from reliability_helpers import QUICKSTART, WORKER, metric_rows, overrides, worker_args

pytestmark = pytest.mark.distributed
STEPS, EVERY, LOSS_RTOL = 8, 2, 1e-5
RUN = [f"train.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=3",
       "data.eval_files=[]", "parallel.dp=2", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """step → (loss, tokens) of one uninterrupted process."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(CollieConfig.load(QUICKSTART, overrides(out, *RUN[:-2]))).fit()
    return steps(out)


def steps(out) -> dict:
    """step → (loss, tokens); a resumed run appends to metrics.jsonl, so a repeated step keeps its last row."""
    return {r["step"]: (r["loss"], r["num_tokens"]) for r in metric_rows(out) if "loss" in r}


def launch(out, *faults, extra=()):
    return run_distributed(WORKER, 2, worker_args(out, *RUN, *extra, faults=faults, dp=2), timeout_s=180)


def assert_same_run(out, reference):
    got = steps(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, (loss, tokens) in reference.items():
        assert got[step][1] == tokens, f"step {step}: other samples than the uninterrupted run"
        assert got[step][0] == pytest.approx(loss, rel=LOSS_RTOL), f"step {step}: {got[step][0]} vs {loss}"


def checkpoints(out) -> list[str]:
    return sorted(os.listdir(out / "checkpoints"))


def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path, reference):
    with pytest.raises(DistributedRunError, match="rank 1 of 2 was killed by SIGKILL"):
        launch(tmp_path, "kill-in-save:4:1")
    assert checkpoints(tmp_path) == [".tmp-step-00000004", "step-00000002"]
    assert any(name.endswith(".distcp") for name in os.listdir(tmp_path / "checkpoints" / ".tmp-step-00000004"))
    launch(tmp_path, extra=["checkpoint.resume=auto"])
    log = (tmp_path / "train.log").read_text()
    assert "removing partial checkpoint" in log and "step-00000002" in log.split("resumed from")[1].splitlines()[0]
    assert ".tmp-step-00000004" not in checkpoints(tmp_path)
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("kind", ["sigterm", "sigint"])
def test_sigterm_or_ctrl_c_finishes_the_step_saves_and_exits_zero(tmp_path, reference, kind):
    launch(tmp_path, f"{kind}:3:1")  # run_distributed raises unless every rank exits 0
    assert [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == [1, 2, 3]
    assert checkpoints(tmp_path) == ["step-00000002", "step-00000003"]
    assert f"{kind.upper()} received: saving a checkpoint at step 3" in (tmp_path / "train.log").read_text()
    launch(tmp_path, extra=["checkpoint.resume=auto"])
    assert [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == list(range(1, STEPS + 1))
    assert_same_run(tmp_path, reference)


def test_a_rank_dying_mid_step_fails_fast_and_the_restart_resumes(tmp_path, reference):
    """Plain processes (no launcher to stop the survivor): rank 0 must notice on its own, well within
    parallel.timeout_s, that its peer is gone — gloo does not hang on a closed connection."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    args = worker_args(tmp_path, *RUN, faults=["die:5:1"], dp=2)
    procs = [subprocess.Popen([sys.executable, WORKER, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    procs[1].wait(timeout=180)
    died = time.monotonic()
    output, _ = procs[0].communicate(timeout=90)
    survivor_s = time.monotonic() - died
    assert procs[1].returncode == -9 and procs[0].returncode != 0
    assert survivor_s < 60, f"rank 0 took {survivor_s:.0f}s to notice (parallel.timeout_s=60)"
    assert "Connection closed by peer" in output or "Connection reset by peer" in output
    assert checkpoints(tmp_path) == ["step-00000002", "step-00000004"]
    launch(tmp_path, extra=["checkpoint.resume=auto"])
    assert_same_run(tmp_path, reference)


def test_torchrun_max_restarts_resumes_after_a_rank_dies(tmp_path, reference):
    """torchrun's agent restarts the worker group once; the restarted ranks (without the fault) resume from the
    last checkpoint. Needs init_parallel to prefix the agent's store per restart (see docs/reliability.md): torch
    2.13 reuses the store, and a restarted gloo group may read its dead predecessors' addresses."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=1", WORKER,
               *worker_args(tmp_path, *RUN, "checkpoint.resume=auto", faults=["die:5:1"], dp=2)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr and "local_rank: 1" in done.stderr
    assert "resumed from" in (tmp_path / "train.log").read_text()
    assert_same_run(tmp_path, reference)
