"""One run per output directory.

``claim_output_dir`` (main process, before anything is written there) creates ``train.output_dir``, takes the
exclusive lock file ``.collie.lock`` (released at exit) and refuses a fresh run into a directory that holds
another run's checkpoints unless ``train.overwrite=true`` (then those checkpoints and metrics are deleted).

The lock file names its holder (host, pid, process start time). It is created atomically with its content
(written aside, then hard-linked into place), so a reader never sees it half written. A lock whose holder ran
on this host and is gone (no such pid, a zombie, or the pid reused by a process started later) is stale and
taken over, as is the lock of an earlier incarnation of the same torchrun job (``--max-restarts``); a holder on
another host cannot be checked, so its lock stands until deleted by hand.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import time

from collie.errors import ConfigError

logger = logging.getLogger("collie")
LOCK_FILE = ".collie.lock"
METRIC_FILES = ("metrics.jsonl", "metrics.csv", "eval_metrics.csv")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            if any(line.startswith("State:") and "Z" in line.split()[1] for line in f):
                return False  # a zombie: dead, not yet reaped
    except OSError:
        pass
    now = _start_ticks(pid)
    return start_ticks is None or now is None or now == start_ticks


class OutputDirLock:
    """The exclusive lock of a run directory, held by this process until ``release`` or exit."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("TORCHELASTIC_RUN_ID")}

    def acquire(self) -> "OutputDirLock":
        for _ in range(3):  # a stale lock removed, then retried; a racing run may take it first
            if self._create():
                atexit.register(self.release)
                return self
            holder = self._holder()
            if holder == {}:
                continue  # released meanwhile
            if holder is not None and self._mine(holder):
                return self  # this process already holds it (a second Trainer in one script)
            if holder is not None and not self._stale(holder):
                raise ConfigError(
                    f"train.output_dir={os.path.dirname(self.path)} is in use by another run (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}); wait for it to "
                    f"finish or choose another train.output_dir (if that process is gone, delete {self.path})")
            logger.warning("taking over the stale lock %s of %s", self.path,
                           "an unreadable holder" if holder is None else
                           f"host {holder.get('host')} pid {holder.get('pid')} (no longer running)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        raise ConfigError(f"cannot lock train.output_dir: {self.path} keeps reappearing (another run is starting)")

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and self._mine(holder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _create(self) -> bool:
        tmp = f"{self.path}.{self.me['pid']}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.me, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _holder(self) -> dict | None:
        """The lock's content; {} when there is no lock file, None when it is unreadable."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _mine(self, holder: dict) -> bool:
        return (holder.get("host"), holder.get("pid"), holder.get("start_ticks")) == \
            (self.me["host"], self.me["pid"], self.me["start_ticks"])

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if not holder or not isinstance(pid, int):
            return True
        if self.me["job"] is not None and holder.get("job") == self.me["job"]:
            return True  # an earlier incarnation of this torchrun job, restarted (maybe on another host)
        return holder.get("host") == self.me["host"] and not _alive(pid, holder.get("start_ticks"))


def claim_output_dir(cfg) -> OutputDirLock:
    """Create ``train.output_dir``, lock it for this run and check that a fresh run does not mix with an earlier
    run's checkpoints (main process only)."""
    output_dir = cfg.train.output_dir
    os.makedirs(output_dir, exist_ok=True)
    lock = OutputDirLock(output_dir).acquire()
    if cfg.checkpoint.resume is None:
        _check_fresh_run(output_dir, cfg.train.overwrite)
    return lock


def _check_fresh_run(output_dir: str, overwrite: bool) -> None:
    root = os.path.join(output_dir, "checkpoints")
    found = sorted(n for n in os.listdir(root) if n.startswith("step-")) if os.path.isdir(root) else []
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"train.output_dir={output_dir} holds checkpoints of an earlier run ({', '.join(found[-3:])}"
                          f"); continue it with checkpoint.resume=auto, choose another train.output_dir, or set "
                          f"train.overwrite=true to delete them and start over")
    logger.warning("train.overwrite=true: deleting %d checkpoints and the metrics of the earlier run in %s",
                   len(found), output_dir)
    shutil.rmtree(root)
    for name in METRIC_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(output_dir, name))
