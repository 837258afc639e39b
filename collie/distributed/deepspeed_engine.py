"""DeepSpeed's ZeRO engine as the alternative to collie's native data parallelism (``parallel.engine: deepspeed``).

Data parallelism only (tp = pp = 1), with a classic optimizer from collie's registry: DeepSpeed partitions its
state (ZeRO-1), gradients (2) and parameters (3), optionally offloaded to CPU. DeepSpeed averages gradients over
the ranks while collie divides each rank's loss by the global token count (a sum), so the loss is scaled by the
data-parallel degree before DeepSpeed's backward.
"""
from __future__ import annotations

import contextlib
import os
import pickle

import torch

from collie.errors import CheckpointError, ConfigError

TAG = "deepspeed"  # the sub-directory of a collie checkpoint that holds DeepSpeed's files


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from e
    # On CPU gloo does the collectives; DeepSpeed's shared-memory all-reduce kernel would first be compiled
    # (a minute or two) for no use.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(cfg, dp: int) -> dict:
    p, t = cfg.parallel, cfg.train
    zero = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum_steps,
              "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
              "gradient_clipping": cfg.optim.clip_grad_norm, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31, "wall_clock_breakdown": False}
    if t.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


class DeepSpeedModel:
    """A DeepSpeed engine as ``collie.engine.deepspeed.DeepSpeedEngine`` drives it."""

    def __init__(self, engine, ctx):
        self.engine, self.ctx = engine, ctx
        self.parts = [engine.module]

    def __call__(self, input_ids, **inputs):
        return self.engine(input_ids, **inputs)

    def parameters(self):
        return list(self.engine.module.parameters())

    def train(self, mode: bool = True):
        self.engine.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch, then DeepSpeed's step, which updates at the accumulation boundary."""
        self.engine.backward(loss * self.ctx.dp, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def full_state_dict(self) -> dict:
        """The whole model's state dict on every rank (ZeRO-3 gathers every parameter at once: for the final
        save, which needs the full model in CPU memory anyway)."""
        deepspeed = _import_deepspeed()
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}

    def save(self, directory: str) -> None:
        """DeepSpeed's own (partitioned) model and optimizer files, in ``directory/deepspeed``."""
        self.engine.save_checkpoint(directory, tag=TAG, save_latest=False)

    def load(self, directory: str) -> None:
        if not os.path.isdir(os.path.join(directory, TAG)):
            raise CheckpointError(f"{directory} has no {TAG}/ directory: it was not saved by the DeepSpeed engine")
        with weights_only_loads():
            path, _ = self.engine.load_checkpoint(directory, tag=TAG, load_module_strict=True,
                                                  load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {os.path.join(directory, TAG)} (saved with another "
                                  f"data-parallel degree or ZeRO stage?)")


def read_deepspeed_weights(directory: str) -> dict:
    """The full fp32 model state dict of a DeepSpeed checkpoint, on CPU, without processes (for export)."""
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=TAG)


# --- loading DeepSpeed's files without running code --------------------------------------------------------

def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints: plain records of numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optimizer states: (numel, start)
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """While DeepSpeed reads a checkpoint (it calls ``torch.load(…, weights_only=False)``), ``torch.load`` runs
    with ``weights_only=True`` and DeepSpeed's own record classes allowed: a file that needs any other global (a
    pickled payload) is refused with a CheckpointError naming it, before anything in it runs."""
    real_load, safe = torch.load, _safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(safe):
                return real_load(f, *args, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(f"cannot load {f}: {_refusal(e)}") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real_load


def _refusal(error: Exception) -> str:
    """The line of torch's weights_only error that names what was refused, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line.split("error: ", 1)[-1].split(" was not", 1)[0] for line in lines if "Unsupported" in line]
    if named:
        return f"{named[0]} is not allowed (loading it could run code; refused)"
    return (lines or [type(error).__name__])[0][:300]


def build_deepspeed_model(model, optimizer, cfg, ctx) -> DeepSpeedModel:
    """Wrap ``model`` (full weights on this rank) and its torch ``optimizer`` in a DeepSpeed engine."""
    deepspeed = _import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, ctx.dp),
                                           dist_init_required=False)
    return DeepSpeedModel(engine, ctx)
