"""What a training checkpoint holds: model, optimizer, scheduler, data position, trainer state and RNG, saved
from and restored into a Trainer (the files themselves: ``collie.checkpoint.store``)."""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from collie.checkpoint.store import STATE_FILE
from collie.errors import CheckpointError

logger = logging.getLogger("collie")


# --- what goes into a checkpoint --------------------------------------------------------------------------

def model_state(parts) -> dict:
    """Parameters (and persistent buffers) of all model parts on this rank, by fully qualified name."""
    state = {}
    for part in parts:
        state.update(part.state_dict())
    return state


def _param_names(parts) -> dict:
    return {param: name for part in parts for name, param in part.named_parameters()}


def init_optimizer_state(optimizer) -> None:
    """Create the optimizer's lazily-built state (so that it can be loaded into) without changing weights."""
    if any(optimizer.state.values()) or getattr(optimizer, "fused_backward", False):
        return
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    _init_optim_state(optimizer)


def optimizer_state(parts, optimizer) -> tuple[dict, dict]:
    """The optimizer's tensors keyed by parameter name, and its other settings as JSON-able data.

    Keys by name (not by position) so that the state follows its parameter to another layout. On ZeRO-1 a rank
    holds state only for the parameters it owns, which DCP stores once. Only tensors go through DCP, whose
    loader would unpickle anything else.
    """
    names = _param_names(parts)
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        if param in names:
            tensors[names[param]] = {k: v for k, v in state.items() if torch.is_tensor(v)}
            scalars[names[param]] = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_extras(parts, optimizer, extras: dict) -> None:
    """Restore what ``optimizer_state`` put in JSON (the tensors were loaded in place by DCP)."""
    names = _param_names(parts)
    for param, state in optimizer.state.items():
        state.update(extras["scalars"].get(names.get(param), {}))
    for group, saved in zip(optimizer.param_groups, extras["param_groups"]):
        group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})


def _tensors(trainer) -> dict:
    if _engine(trainer) is not None:  # DeepSpeed writes and reads its partitioned files itself
        return {}
    optim_tensors, _ = optimizer_state(trainer.model_parts, trainer.optimizer)
    return {"model": model_state(trainer.model_parts), "optim": optim_tensors}


def _engine(trainer):
    """The model when an engine checkpoints itself (``DeepSpeedModel``), else None."""
    from collie.distributed.deepspeed_engine import DeepSpeedModel
    return trainer.model if isinstance(trainer.model, DeepSpeedModel) else None


def _loss_scaler(trainer):
    """The fused optimizer's loss scaler, else the trainer's GradScaler (either may be disabled)."""
    return getattr(trainer.optimizer, "loss_scaler", None) or trainer.scaler


def save_trainer(trainer) -> str:
    """A checkpoint of everything the trainer needs to continue exactly where it is."""
    engine = _engine(trainer)
    optim_extras = {} if engine else optimizer_state(trainer.model_parts, trainer.optimizer)[1]
    state = {"trainer": vars(trainer.state), "scheduler": trainer.scheduler.state_dict(),
             "data": trainer.batches.state_dict(), "optimizer": optim_extras,
             "loss_scaler": _loss_scaler(trainer).state_dict(),
             "model_args": dataclasses.asdict(trainer.model_args), "config": trainer.cfg.to_dict(),
             "layout": {"dp": trainer.ctx.dp, "tp": trainer.ctx.tp, "pp": trainer.ctx.pp,
                        "engine": trainer.cfg.parallel.engine}}
    return trainer.checkpointer.save(trainer.state.step, _tensors(trainer), state,
                                     engine.save if engine else None)


def resume_trainer(trainer) -> None:
    """Continue from ``checkpoint.resume`` (a directory, or 'auto' for the latest one, if any) — also when the
    checkpoint was saved at another dp/tp/pp layout."""
    manager, resume = trainer.checkpointer, trainer.cfg.checkpoint.resume
    manager.remove_partial()
    path = manager.latest_intact() if resume == "auto" else resume  # skips damaged checkpoints
    if path is None:
        if resume == "auto":
            logger.info("checkpoint.resume=auto: no checkpoint in %s, starting from scratch", manager.root)
        return
    engine = _engine(trainer)
    if engine is None:
        init_optimizer_state(trainer.optimizer)
    tensors = _tensors(trainer)
    state = manager.load(path, tensors)
    _check_engine(path, state, trainer.cfg.parallel.engine)
    if engine is not None:
        engine.load(path)
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
    if tensors:
        for part in trainer.model_parts:  # DCP loaded in place; this also re-ties shared weights
            names = part.state_dict().keys()
            part.load_state_dict({k: v for k, v in tensors["model"].items() if k in names})
        load_optimizer_extras(trainer.model_parts, trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("loss_scaler"):
        _loss_scaler(trainer).load_state_dict(state["loss_scaler"])
    trainer.batches.load_state_dict(state["data"])
    trainer.state = type(trainer.state)(**state["trainer"])
