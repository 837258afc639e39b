"""Start N local ranks of a script for tests and benchmarks, the way torchrun would, and collect their results.

    results = run_distributed("tests/distributed/harness.py", 2, ["--layouts", "dp2"], timeout_s=120)

Each rank is a plain process with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT=<free port>) plus COLLIE_RESULT_DIR; a rank reports with ``write_rank_result(obj)``. When a rank
fails the others are stopped at once and the error names the rank that failed first (a rank killed by a signal
before one that only lost its peer) and carries its output; the whole run has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from collie.errors import CollieError


class DistributedRunError(CollieError):
    """A rank exited with an error or the run exceeded its timeout; the message holds the rank's stderr."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rank_result(result) -> None:
    """Called inside a rank: store ``result`` (JSON-serialisable) for ``run_distributed`` to return."""
    directory = os.environ.get("COLLIE_RESULT_DIR")
    if directory:
        with open(os.path.join(directory, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump(result, f)


def run_distributed(script: str, nproc: int, args=(), timeout_s: float = 300, env: dict | None = None,
                    threads_per_rank: int = 1, result_dir: str | None = None) -> list:
    """Run ``script`` (a .py path, or a module name for ``python -m``) on ``nproc`` local ranks; return each
    rank's result (None for a rank that wrote none). ``result_dir`` (default: a temporary directory) is
    COLLIE_RESULT_DIR, where ranks may also leave files for the caller."""
    command = [sys.executable, script] if script.endswith(".py") else [sys.executable, "-m", script]
    with tempfile.TemporaryDirectory(prefix="collie-ranks-") as tmp:
        workdir = result_dir or tmp
        base_env = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "COLLIE_RESULT_DIR": workdir,
                    "OMP_NUM_THREADS": str(threads_per_rank)}
        procs, logs = [], []
        for rank in range(nproc):
            log = open(os.path.join(workdir, f"stderr{rank}.log"), "w+")
            rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([*command, *map(str, args)], env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT))
            logs.append(log)
        try:
            _wait(procs, logs, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        results = []
        for rank in range(nproc):
            path = os.path.join(workdir, f"rank{rank}.json")
            results.append(json.load(open(path)) if os.path.exists(path) else None)
        return results


def _wait(procs, logs, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            raise DistributedRunError(_failure_message(_root_cause_rank(failed, codes), codes, logs))
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            raise DistributedRunError(f"timed out after {timeout_s:.0f}s; ranks {running} still running; rank "
                                      f"{running[0]} output:\n{_tail(logs[running[0]])}")
        time.sleep(0.05)


def _root_cause_rank(failed: list[int], codes: list) -> int:
    """Of ranks seen failing in the same poll, one killed by a signal is the cause; the others lost their peer."""
    killed = [r for r in failed if codes[r] < 0]
    return (killed or failed)[0]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _failure_message(rank: int, codes: list, logs) -> str:
    others = [f"rank {r} {_describe_exit(c)}" for r, c in enumerate(codes) if r != rank and c not in (None, 0)]
    also = f" ({'; '.join(others)} as well)" if others else ""
    return (f"rank {rank} of {len(codes)} {_describe_exit(codes[rank])}{also}; the other ranks were stopped. "
            f"Rank {rank} output:\n{_tail(logs[rank])}")


def _tail(log, chars: int = 6000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]
