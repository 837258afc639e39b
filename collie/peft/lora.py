"""LoRA applied from outside the model, tensor-parallel aware.

``apply_lora`` gives each targeted linear two child modules, ``lora_A`` (in → r) and ``lora_B`` (r → out), and a
forward hook that adds ``lora_B(lora_A(dropout(x))) · alpha/r`` to the linear's output. Base parameter names
do not change (``…q_proj.weight``), so Hugging Face checkpoints still load by name; the factors are
``…q_proj.lora_A.weight`` / ``…q_proj.lora_B.weight``, as in peft.

Tensor parallel: the hook does plain tensor algebra, so it runs on local tensors and on DTensors alike. Wrap
the tensor-parallel plan with ``lora_tensor_parallel_plan`` and the factors follow the base layer's sharding:

| base layer | base weight | lora_A | lora_B | forward communication added |
|---|---|---|---|---|
| column-parallel (q/k/v/gate/up, lm_head) | Shard(0) | Replicate | Shard(0) | none |
| row-parallel (o/down) | Shard(1) | Shard(1) | Replicate | none: A·x, a partial sum, joins the output's reduce |
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from collie.errors import ConfigError

# Every linear of a Llama-family decoder, by the last component of its name.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
_LORA_CHILDREN = ("lora_A", "lora_B", "lora_dropout")
# a routed expert's modules (collie.models.moe: ``…mlp.experts.<index>.gate_proj``, also under expert parallelism)
ROUTED_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA hyper-parameters a model was adapted with (kept on the model as ``model.lora_spec``)."""
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    experts: bool = False  # the routed experts' target linears are adapted too (peft.lora_experts)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=("q_proj", "v_proj"), seed: int = 0, experts: bool = False) -> list[str]:
    """Add LoRA factors to every linear whose last name component is in ``target_modules`` and freeze all
    other parameters. A mixture-of-experts model's routed experts (``…experts.<i>.…``) are left alone unless
    ``experts``: then each routed expert gets factors of its own. Works on a model on any device, meta included
    (then the factors are left for a state dict or ``lora_initial_state`` to fill). Returns the names of the
    adapted linears."""
    spec = LoraSpec(r, float(alpha), float(dropout), tuple(target_modules), experts)
    targets = _find_targets(model, spec.target_modules, experts)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        _add_factors(model.get_submodule(name), spec)
    model.lora_spec = spec
    if not any(p.is_meta for p in lora_parameters(model).values()):
        load_lora_initial_state(model, seed)
    return targets


def _find_targets(model: nn.Module, target_modules: tuple[str, ...], experts: bool = False) -> list[str]:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    routed = {name.rsplit(".", 1)[-1] for name in linears if ROUTED_EXPERT.search(name)}
    if experts:
        check_expert_targets(routed, target_modules)
    else:
        linears = {name: m for name, m in linears.items() if not ROUTED_EXPERT.search(name)}
    available = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in target_modules if t not in available]
    others = {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] in unknown and not isinstance(m, nn.Linear)}
    if others:  # e.g. GPT-2's c_attn, a transformers Conv1D
        name, kind = next(iter(others.items()))
        raise ConfigError(f"peft.target_modules: {name} is a {kind}, not a torch.nn.Linear; collie's LoRA adapts "
                          f"linears only: choose from {', '.join(available) or 'none (this model has no linears)'}")
    if unknown or not target_modules:
        hint = "" if experts or not set(unknown) & routed else \
            " (the routed experts' linears get adapters only with peft.lora_experts=true)"
        raise ConfigError(f"peft.target_modules={list(target_modules)}: {unknown or 'empty'} matches no linear of "
                          f"this model{hint}; its linears are {', '.join(available)}")
    return [name for name in linears if name.rsplit(".", 1)[-1] in target_modules]


def check_expert_targets(routed: set[str], target_modules: tuple[str, ...]) -> None:
    """peft.lora_experts=true needs routed experts and a target among their linears."""
    if not routed:
        raise ConfigError("peft.lora_experts=true adapts routed experts, but this model has none (collie's "
                          "mixture-of-experts architectures: mixtral, qwen2_moe, qwen3_moe); set it to false")
    if not routed & set(target_modules):
        raise ConfigError(f"peft.lora_experts=true, but peft.target_modules={list(target_modules)} names none of "
                          f"the routed experts' linears; add some of {', '.join(sorted(routed))}")


def _add_factors(linear: nn.Linear, spec: LoraSpec) -> None:
    if hasattr(linear, "lora_A"):
        raise ConfigError("LoRA is already applied to this model; apply it once")
    if isinstance(linear.weight, DTensor):
        raise ConfigError("apply LoRA before tensor parallelism (on the meta-device model given to "
                          "collie.distributed.parallelize), so that the plan shards its factors too")
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    linear.lora_A = nn.Linear(linear.in_features, spec.r, bias=False, **factory)
    linear.lora_B = nn.Linear(spec.r, linear.out_features, bias=False, **factory)
    linear.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
    linear.lora_scale = spec.scale
    # prepend: run before a tensor-parallel output hook, while the output is still a DTensor
    linear.register_forward_hook(_lora_forward, prepend=True)


def _lora_forward(linear: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: output + B(A(dropout(x))) · scale (x after any input hook, e.g. a DTensor under TP)."""
    x = args[0]
    return output + linear.lora_B(linear.lora_A(linear.lora_dropout(x))) * linear.lora_scale


def lora_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Name → linear for every linear that carries LoRA factors."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → parameter of every LoRA factor (``….lora_A.weight`` / ``….lora_B.weight``)."""
    return {name: p for name, p in model.named_parameters() if name.endswith((".lora_A.weight", ".lora_B.weight"))}


# --- initialisation --------------------------------------------------------------------------------------

def lora_initial_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-size CPU initial values of the model's LoRA factors, as peft initialises them: A kaiming-uniform
    (a=√5), B zeros. Each factor draws from its own generator seeded by ``seed`` and its name, so a sharded
    model, a pipeline stage or a whole one-process model get the same values. Parameter shapes are global
    shapes, so this works on a meta, tensor-parallel or ZeRO-wrapped model too (load the result with
    ``collie.distributed.load_full_state_dict`` or as part of ``parallelize``'s ``init_fn``)."""
    state = {}
    for name, param in lora_parameters(model).items():
        value = torch.zeros(param.shape, dtype=param.dtype)
        if name.endswith(".lora_A.weight"):
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        state[name] = value
    return state


@torch.no_grad()
def load_lora_initial_state(model: nn.Module, seed: int = 0) -> None:
    """Initialise the LoRA factors of an allocated model in place."""
    params = lora_parameters(model)
    for name, value in lora_initial_state(model, seed).items():
        params[name].copy_(value)


# --- parameters for the optimizer and the monitors ---------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: those with ``requires_grad`` (each once, tied ones included)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; DTensors count their global size."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- merging ---------------------------------------------------------------------------------------------

@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA factor pair into its base weight (W += scale · B·A, in fp32) and remove the factors and
    hooks: the result is the plain model (saveable with ``collie.models.save_pretrained``), with every
    parameter trainable again. Works on tensor-parallel DTensor weights too (the product takes the weight's
    sharding)."""
    for linear in lora_linears(model).values():
        linear.weight.copy_(merged_weight(linear.weight, linear.lora_A.weight, linear.lora_B.weight,
                                          linear.lora_scale))
        _remove_factors(linear)
    for param in model.parameters():
        param.requires_grad_(True)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale · B·A, computed in fp32 and rounded to W's dtype (the one merge rule: ``merge_lora`` and
    ``collie.peft.export.merged_state_dict``)."""
    return (weight.float() + (lora_B.float() @ lora_A.float()) * scale).to(weight.dtype)


def _remove_factors(linear: nn.Module) -> None:
    for key, hook in list(linear._forward_hooks.items()):
        if hook is _lora_forward:
            del linear._forward_hooks[key]
    for name in _LORA_CHILDREN:
        delattr(linear, name)
    del linear.lora_scale


# --- tensor parallel -------------------------------------------------------------------------------------

def lora_tensor_parallel_plan(plan: dict) -> dict:
    """``plan`` (module name → ParallelStyle) with every style wrapped in ``LoraParallel``, so that a targeted
    linear's LoRA factors are sharded to match its base weight (modules without LoRA are unaffected)."""
    return {key: LoraParallel(style) for key, style in plan.items()}


class LoraParallel(ParallelStyle):
    """Applies ``style`` to the module as if it had no LoRA factors, then shards the factors to match the base
    weight."""

    def __init__(self, style: ParallelStyle):
        super().__init__()
        self.style = style

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        children = {name: module._modules.pop(name) for name in _LORA_CHILDREN if name in module._modules}
        self.style.src_data_rank = self.src_data_rank
        module = self.style._apply(module, device_mesh)  # the stock style sees a plain Linear
        if children:
            placements = _factor_placements(module.weight.placements[0])
            for name, placement in zip(("lora_A", "lora_B"), placements):
                weight = children[name].weight
                children[name].weight = nn.Parameter(
                    distribute_tensor(weight, device_mesh, [placement], src_data_rank=self.src_data_rank),
                    requires_grad=weight.requires_grad)
            for name, child in children.items():
                module.add_module(name, child)
        return module

    def __repr__(self) -> str:
        return f"LoraParallel({self.style!r})"


def _factor_placements(base_placement) -> tuple:
    """(lora_A, lora_B) placements for a base weight placement: column-parallel (Shard(0)) shards B's output
    rows; row-parallel (Shard(1)) shards A's input columns (its r-dim output is then a partial sum)."""
    if base_placement == Shard(0):
        return Replicate(), Shard(0)
    if base_placement == Shard(1):
        return Shard(1), Replicate()
    return Replicate(), Replicate()
