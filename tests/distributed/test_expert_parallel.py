"""Expert parallelism (``parallel.ep``): the layout rules, and checkpoints that move between ep degrees.

The end-to-end equality with one process (losses, gradient norms, evaluations, exported and converted weights,
generations) of dp2_ep2_zero3 and dp4_ep2_zero1 (2 replicas of each expert) is in the layout matrix
(tests/distributed/test_layout_matrix.py, feature "mixtral"). Here: a checkpoint saved at ep=2 resumes at ep=1 and
one saved at ep=1 resumes at ep=2 (dp2_ep2, ZeRO-0), continuing the uninterrupted one-process run (the DCP checkpoint
holds every expert under its global name, whatever the ep degree that wrote it).
"""
from __future__ import annotations

import json
import os

import pytest
import test_layout_matrix as matrix
from test_layout_matrix import ROOT, assert_same_steps, collie_train

from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.layout_rules import check_expert_parallel, check_expert_parallel_model

pytestmark = pytest.mark.distributed
reference = matrix.reference  # the one-process runs, shared with the layout matrix
RESUMES = [("dp2_ep2_zero3", "single"), ("single", "dp2_ep2")]


@pytest.mark.parametrize("saved_in, resumed_in", RESUMES, ids=[f"{a}-to-{b}" for a, b in RESUMES])
def test_checkpoint_resumes_at_another_ep_degree(saved_in, resumed_in, reference, tmp_path):
    collie_train(tmp_path / "first", "mixtral", saved_in, "train.max_steps=2", "eval.before_training=false")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000002"
    collie_train(tmp_path / "second", "mixtral", resumed_in, f"checkpoint.resume={checkpoint}",
                 "eval.before_training=false")
    rows = [json.loads(line) for line in open(tmp_path / "second" / "metrics.jsonl")]
    got = {r["step"]: r for r in rows if "loss" in r}
    assert_same_steps(got, reference("mixtral")["steps"], [3, 4], f"{saved_in} → {resumed_in}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(cp=2), "parallel.cp=2"),
    (dict(dp_replicate=2), "parallel.dp_replicate=2"), (dict(engine="deepspeed"), "engine=native"),
    (dict(peft="ia3"), "peft.method=ia3"),
    (dict(backend="hf"), "model.backend=hf"), (dict(cpu_offload=True), "cpu_offload"),
    (dict(dp=3), "does not divide parallel.dp=3"),
])
def test_layout_rules_refuse_what_ep_does_not_run_with(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_expert_parallel(2, **{"dp": 2, **kwargs})
    check_expert_parallel(2, dp=4)
    check_expert_parallel(2, dp=2, peft="lora")  # adapters stay with their experts (layout matrix)
    check_expert_parallel(1, cp=2)  # ep=1: nothing to check


def test_model_rules_need_experts_divisible_by_ep():
    with pytest.raises(ConfigError, match="architecture llama has none"):
        check_expert_parallel_model(2, "llama", None)
    with pytest.raises(ConfigError, match="does not divide num_experts=6: each ep rank holds num_experts/ep experts; choose parallel.ep from 1, 2, 3, 6"):
        check_expert_parallel_model(4, "mixtral", 6)
    check_expert_parallel_model(2, "mixtral", 4)


def test_config_refuses_ep_with_context_parallel():
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 does not yet compose with parallel\.cp=2"):
        CollieConfig.load(os.path.join(ROOT, "configs", "pretrain_moe_ep.yaml"),
                          ["parallel.cp=2", "model.arch.router_aux_loss_coef=0", "model.arch.router_z_loss_coef=0"])
    CollieConfig.load(os.path.join(ROOT, "configs", "pretrain_moe_ep.yaml"), ["parallel.tp=2", "optim.name=adalomo"])
