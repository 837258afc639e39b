"""Parameter groups by name: which parameters get weight decay.

The convention of transformers' Trainer, nanoGPT and Megatron: weight decay shrinks the matrices of linear
layers (and, by choice, the embeddings) but not the gains of normalisation layers nor biases, whose scale
the model needs. ``optim.no_decay`` names the kinds exempt from decay (default ``[norm, bias]``; add
``embedding`` to exempt the embeddings too)::

    groups = param_groups(model.named_parameters(), no_decay=["norm", "bias"], weight_decay=0.1)
    # [{"name": "decay", "params": [...], "weight_decay": 0.1}, {"name": "no_decay", "params": [...], "weight_decay": 0.0}]

The kinds are told from the parameter's fully qualified NAME, never from its shape or module type, so the same
parameter lands in the same group whether it is a plain tensor, a DTensor sharded by tensor parallelism or
FSDP2 (whose local shard may be flat or empty), or part of one pipeline stage: every rank builds the same
groups for the parameters it holds. Wrapper prefixes (``_orig_mod.``, ``_checkpoint_wrapped_module.``,
``base_model.model.``) do not matter.

The groups are always listed in the same order (``decay``, then ``no_decay``, then the routed experts' own
``decay_experts`` and ``no_decay_experts`` of a mixture-of-experts model) and an empty one is left out, so
checkpoints, which save ``param_groups`` settings by index and name, line up across layouts. The experts have groups
of their own because expert parallelism puts them on another device mesh, which torch's multi-tensor (foreach)
updates cannot mix with the rest; they have them in every layout so that the groups line up.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

NO_DECAY_KINDS = ("norm", "bias", "embedding")
DEFAULT_NO_DECAY = ("norm", "bias")
EXPERT = re.compile(r"\.experts\.\d+\.")  # a routed expert's parameters (collie.models.moe)


def parameter_kinds(name: str) -> set[str]:
    """The kinds of the parameter called ``name`` (``model.layers.0.input_layernorm.weight`` → {"norm"}):
    ``norm`` for the parameters of a module whose name contains "norm" or starts with "ln" (ln_f, ln_1),
    ``bias`` for a parameter called "bias", ``embedding`` for the parameters of a module whose name contains
    "embed" or is "wte"/"wpe"."""
    *modules, leaf = name.lower().split(".")
    kinds = set()
    if any("norm" in m or m.startswith("ln") for m in modules):
        kinds.add("norm")
    if leaf == "bias" or leaf.endswith("_bias"):
        kinds.add("bias")
    if any("embed" in m or m in ("wte", "wpe") for m in modules):
        kinds.add("embedding")
    return kinds


def is_decayed(name: str, no_decay: Iterable[str] = DEFAULT_NO_DECAY) -> bool:
    """Whether weight decay applies to the parameter ``name`` (none of its kinds is in ``no_decay``)."""
    return not parameter_kinds(name) & set(no_decay)


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], no_decay: Iterable[str] = DEFAULT_NO_DECAY,
                 weight_decay: float = 0.0) -> list[dict]:
    """Torch optimizer param groups: ``decay`` (``weight_decay``) and ``no_decay`` (0.0), each parameter once
    (a tied weight under two names goes where its first name puts it), empty groups left out."""
    no_decay = set(no_decay)
    unknown = no_decay - set(NO_DECAY_KINDS)
    if unknown:
        raise ValueError(f"no_decay={sorted(no_decay)}: unknown kind(s) {sorted(unknown)}; "
                         f"choose from {', '.join(NO_DECAY_KINDS)}")
    decay, exempt, seen, experts = [], [], set(), set()
    for name, param in named_params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        if EXPERT.search(name):
            experts.add(id(param))
        (decay if is_decayed(name, no_decay) else exempt).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": exempt, "weight_decay": 0.0}]
    groups += [{**g, "name": f"{g['name']}_experts", "params": [p for p in g["params"] if id(p) in experts]}
               for g in groups]
    for group in groups[:2]:
        group["params"] = [p for p in group["params"] if id(p) not in experts]
    return [g for g in groups if g["params"]]
