"""What a training checkpoint holds — the engine's model and optimizer state, scheduler, data position, trainer
state and RNG — saved from and restored into a Trainer. The files themselves: ``collie.checkpoint.store``."""
from __future__ import annotations

import dataclasses
import logging
import os

from collie.checkpoint.store import STATE_FILE
from collie.errors import CheckpointError

logger = logging.getLogger("collie")


def save_trainer(trainer) -> str:
    """A checkpoint of everything the trainer needs to continue exactly where it is."""
    engine = trainer.engine
    state = {"trainer": vars(trainer.state), "scheduler": trainer.scheduler.state_dict(),
             "data": trainer.batches.state_dict(), **engine.extra_state(),
             "model_args": dataclasses.asdict(trainer.model_args), "config": trainer.cfg.to_dict(),
             "layout": {"dp": trainer.ctx.dp, "tp": trainer.ctx.tp, "pp": trainer.ctx.pp,
                        "engine": trainer.cfg.parallel.engine}}
    return trainer.checkpointer.save(trainer.state.step, engine.state_dict(), state, engine.save_files)


def resume_trainer(trainer) -> None:
    """Continue from ``checkpoint.resume`` (a directory, or 'auto' for the latest one, if any) — also when the
    checkpoint was saved at another dp/tp/pp layout."""
    manager, resume, engine = trainer.checkpointer, trainer.cfg.checkpoint.resume, trainer.engine
    manager.remove_partial()
    path = manager.latest_intact() if resume == "auto" else resume  # skips damaged checkpoints
    if path is None:
        if resume == "auto":
            logger.info("checkpoint.resume=auto: no checkpoint in %s, starting from scratch", manager.root)
        return
    engine.prepare_load()
    tensors = engine.state_dict()
    state = manager.load(path, tensors)
    _check_engine(path, state, trainer.cfg.parallel.engine)
    engine.load_files(path)
    try:
        _restore(trainer, tensors, state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{os.path.join(path, STATE_FILE)} does not fit this trainer: "
                              f"{type(e).__name__}: {e}") from None
    logger.info("resumed from %s (saved at %s) at step %d", path, state.get("layout"), trainer.state.step)


def _check_engine(path: str, state: dict, engine: str) -> None:
    saved = state.get("layout", {}).get("engine", "native")
    if saved != engine:
        raise CheckpointError(f"{path} was saved by the {saved} ZeRO engine and this job runs parallel.engine="
                              f"{engine}; resume with parallel.engine={saved}, or export the model with `collie "
                              f"convert {path} OUT` and start from it (model.pretrained=OUT)")


def _restore(trainer, tensors: dict, state: dict) -> None:
    trainer.engine.load_state_dict(tensors, state)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.batches.load_state_dict(state["data"])
    trainer.state = type(trainer.state)(**state["trainer"])
