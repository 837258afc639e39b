"""Logging: the ``collie`` logger writes to the console on the main process and to ``train.log`` in the run.

On a terminal the console gets rich's columns (time, level, wrapped message); anywhere else (a file, a pipe, a
SLURM log) every entry is exactly one line, like ``train.log``'s, so that grep and tail see whole entries.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("collie")
LINE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class OneLineFormatter(logging.Formatter):
    """``LINE_FORMAT`` with the line breaks of a message (and of a traceback) shown as `` | ``."""

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line.strip())


def console_is_terminal() -> bool:
    """Whether the console (rich's, stdout) is an interactive terminal; rich's rules (FORCE_COLOR, TTY_…) apply."""
    from rich import get_console
    return get_console().is_terminal


def console_handler() -> logging.Handler:
    """Rich's handler on a terminal; otherwise one line per entry on stdout (where rich would write)."""
    if console_is_terminal():
        from rich.logging import RichHandler
        return RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter(LINE_FORMAT))
    return handler


def setup_logging(output_dir: str | None, is_main_process: bool, rank: int = 0) -> None:
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if is_main_process:
        logger.addHandler(console_handler())
    if output_dir:
        name = "train.log" if rank == 0 else f"train.rank{rank}.log"
        file_handler = logging.FileHandler(os.path.join(output_dir, name))
        file_handler.setFormatter(OneLineFormatter(LINE_FORMAT))
        logger.addHandler(file_handler)
