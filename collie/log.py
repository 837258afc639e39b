"""Logging: the ``collie`` logger writes to the console on the main process and to ``train.log`` in the run."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("collie")


def setup_logging(output_dir: str | None, is_main_process: bool, rank: int = 0) -> None:
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if is_main_process:
        from rich.logging import RichHandler
        logger.addHandler(RichHandler(show_path=False, markup=False, rich_tracebacks=False))
    if output_dir:
        name = "train.log" if rank == 0 else f"train.rank{rank}.log"
        file_handler = logging.FileHandler(os.path.join(output_dir, name))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
