"""No job can hang: a watchdog thread ends a rank that makes no progress for ``parallel.timeout_s``.

Process-group timeouts bound each collective on gloo and NCCL, but not every wait: a rank can block in a pipeline
receive, in a gather its peers never join because they took another branch, or in a thread of a library. The
watchdog does not care where: the training loop names the operation it is in (``operation("training step 7")``)
and every forward of the model counts as progress (``watch_module``). When nothing moves for ``timeout_s`` the rank
prints one line naming itself and the operation, and exits with code 124; torchrun then stops the others.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from collie.errors import CollieError

EXIT_CODE = 124  # what timeout(1) returns: the job ran out of time


class PeerError(CollieError):
    """A collective failed because another rank timed out, stalled or died."""


def is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another rank died or timed out (gloo/NCCL), not a bug on this rank."""
    import torch.distributed as dist
    text = str(error).lower()
    return isinstance(error, dist.DistError) or ("gloo" in text and any(
        word in text for word in ("connection", "peer", "timed out", "timeout")))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, poll_s: float | None = None):
        self.timeout_s, self.rank = float(timeout_s), rank
        self._operation, self._since = "training", time.monotonic()
        self._stopped, self._hooks = threading.Event(), []
        self._poll_s = poll_s or min(1.0, self.timeout_s / 10)
        self._thread = threading.Thread(target=self._watch, name="collie-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def operation(self, name: str):
        """Name what this rank is doing until the block ends (nested blocks restore the outer name). A collective
        that fails because a peer timed out or died becomes a one-line ``PeerError`` naming the operation."""
        outer, self._operation = self._operation, name
        self.beat()
        try:
            yield
        except RuntimeError as e:
            if not is_peer_failure(e):
                raise
            raise PeerError(f"rank {self.rank} lost a peer during {name}: {first_line(e)}; another rank failed "
                            f"or stalled first: its log (and torchrun's summary) says why") from None
        finally:
            self._operation = outer
            self.beat()

    def beat(self, *_) -> None:
        """Progress: the current operation moved (usable as a forward pre-hook)."""
        self._since = time.monotonic()

    def watch_module(self, module) -> None:
        """Count every forward of ``module`` as progress (until ``stop``)."""
        self._hooks.append(module.register_forward_pre_hook(self.beat))

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        for hook in self._hooks:
            hook.remove()

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll_s):
            idle = time.monotonic() - self._since
            if idle > self.timeout_s:
                self._fail(idle)

    def _fail(self, idle: float) -> None:
        print(f"collie: error: rank {self.rank} made no progress for {idle:.0f} s in {self._operation} "
              f"(parallel.timeout_s={self.timeout_s:g}): a peer rank stalled, died or took another branch; "
              f"stopping the job", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


class NoWatchdog:
    """One process waits for nobody: the same interface, doing nothing."""

    @contextlib.contextmanager
    def operation(self, name: str):
        yield

    def beat(self, *_) -> None:
        pass

    def watch_module(self, module) -> None:
        pass

    def stop(self) -> None:
        pass


def start_watchdog(ctx):
    """A ``Watchdog`` for a job of several processes, else a ``NoWatchdog``."""
    return Watchdog(ctx.cfg.timeout_s, ctx.rank) if ctx.world_size > 1 else NoWatchdog()
