"""``python -m collie ARGS`` on local ranks under torchrun (gloo on CPU), started as a user starts a job; a run that
hangs ends at the timeout instead of stalling the test suite."""
from __future__ import annotations

import os
import subprocess
import sys


def torchrun_collie(args: list[str], ranks: int, log: str, timeout_s: float) -> int | str:
    """The exit code of ``torchrun --nproc_per_node ranks -m collie *args`` (output in ``log``), or 'a hang: timed
    out'."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "collie", *args]
    with open(log, "w") as f:
        try:
            return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        except subprocess.TimeoutExpired:
            return "a hang: timed out"
