"""Impossible layouts fail with ConfigErrors that say what to choose, before any process starts: every rule of
collie.layout_rules names its key, and config load, the estimator and the planner agree (they call the same rules);
model-shape rules; stage splitting; the launcher stops at the first failing rank."""
import itertools
import os

import pytest
import torch

from collie import layout_rules as rules
from collie.config import CollieConfig, ParallelConfig
from collie.distributed import resolve_degrees, split_layers, validate_model_for_layout
from collie.distributed.data_parallel import apply_data_parallel
from collie.distributed.launch import DistributedRunError, run_distributed
from collie.distributed.mesh import init_parallel
from collie.distributed.pipeline import PipelineRunner
from collie.errors import ConfigError
from collie.estimate import Setup
from collie.estimate.plan import plan
from collie.models import ModelArgs, load_card

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")  # micro_batch_size 32, eval.batch_size 64

# (rule, arguments that violate it, the key its message must name)
VIOLATIONS = [
    (rules.check_degrees, (0,), "parallel.dp=0"),
    (rules.resolve_dp, (4, 1, 2, 1), "parallel.dp=1"),
    (rules.resolve_dp, (3, -1, 2, 1), "parallel.tp=2"),
    (rules.check_launch, ("deepspeed", False), "parallel.engine=deepspeed"),
    (rules.check_pp_boundaries, (2, [1, 2]), "parallel.pp_boundaries"),
    (rules.check_microbatches, (1, 2, "1f1b"), "parallel.pp_microbatches=1"),
    (rules.check_microbatches, (5, 2, "interleaved_1f1b"), "parallel.pp_microbatches=5"),
    (rules.check_pipeline_batch, (6, 4), "train.micro_batch_size=6"),
    (rules.check_pipeline_batch, (50, 4, "eval.batch_size"), "eval.batch_size=50"),
    (rules.check_choice_metrics, (["multiple_choice"], 2), "eval.metrics"),
    (rules.check_sequence_parallel, (True, 1, 1, 128), "parallel.sequence_parallel"),
    (rules.check_sequence_parallel, (True, 2, 2, 127), "data.seq_len=127"),
    (rules.check_loss_chunk, (64, 2, 1, 1, "none"), "train.loss_chunk_size"),
    (rules.check_loss_chunk, (64, 1, 1, 1, "prefix"), "peft.method=prefix"),
    (rules.check_cpu_offload, (True, 1), "parallel.zero_stage"),
    (rules.check_cpu_offload, (True, 3, "native", 1, 2), "parallel.dp"),
    (rules.check_fused_optimizer, ("lomo", 2, 0, "native"), "parallel.pp=2"),
    (rules.check_fused_optimizer, ("adalomo", 1, 1, "native"), "parallel.zero_stage=1"),
    (rules.check_fused_optimizer, ("lomo", 1, 0, "deepspeed"), "parallel.engine=deepspeed"),
    (rules.check_sophia, ("sophia", 2), "parallel.pp=2"),
    (rules.check_sophia, ("sophia", 1, 2), "parallel.cp=2"),
    (rules.check_dp_replicate, (2, 4, 3, "deepspeed"), "parallel.engine=native"),
    (rules.check_dp_replicate, (2, 4, 1), "parallel.zero_stage 2 or 3"),
    (rules.check_dp_replicate, (3, 4, 3), "parallel.dp_replicate=3 does not divide parallel.dp=4"),
    (rules.check_dp_replicate, (4, 4, 2), "choose parallel.dp_replicate 1 or 2"),
    (rules.check_deepspeed, ("deepspeed", 2, 1, "adamw", 0.0, "none"), "parallel.tp=2"),
    (rules.check_deepspeed, ("deepspeed", 1, 1, "sophia", 0.0, "none"), "optim.name=sophia"),
    (rules.check_deepspeed, ("deepspeed", 1, 1, "adamw", 1.0, "none"), "optim.clip_grad_value"),
    (rules.check_deepspeed, ("deepspeed", 1, 1, "adamw", 0.0, "ia3"), "peft.method=ia3"),
]


@pytest.mark.parametrize("rule, arguments, key", VIOLATIONS, ids=lambda v: getattr(v, "__name__", None))
def test_each_rule_names_its_key(rule, arguments, key):
    with pytest.raises(ConfigError) as error:
        rule(*arguments)
    assert key in str(error.value) and "\n" not in str(error.value)


def test_valid_layouts_pass():
    rules.check_layout()
    rules.check_layout(dp=2, pp=2, micro_batch_size=8, eval_batch_size=4, pp_microbatches=4, optimizer="adamw")
    for zero in (0, 2, 3):  # fused optimizers run at ZeRO 0, 2 and 3 (not 1: it splits step())
        rules.check_layout(dp=2, zero_stage=zero, optimizer="lomo", fused=True)
    rules.check_layout(dp=2, zero_stage=1, cpu_offload=True, engine="deepspeed")  # DeepSpeed checks its own
    rules.check_cpu_offload(True, 3, "native", dp=1, world_size=1)  # one process ignores parallel settings
    rules.check_layout(dp=8, dp_replicate=2, zero_stage=3, tp=2, pp=2, micro_batch_size=4)  # HSDP composes
    rules.check_layout(dp=-1, dp_replicate=4, zero_stage=2)  # dp resolved at launch: divisibility checked then
    assert rules.pipeline_microbatches(1, 8) == 1 and rules.pipeline_microbatches(3, None) == 6


# --- at config load (issue 20: every check that can be made before training is) ------------------------

def test_eval_batch_size_under_pipeline_fails_at_load_naming_it():
    with pytest.raises(ConfigError, match=r"eval.batch_size=50 must be a multiple of the 4 pipeline micro-batches"):
        CollieConfig.load(QUICKSTART, ["parallel.pp=2", "eval.batch_size=50"])
    CollieConfig.load(QUICKSTART, ["parallel.pp=2", "eval.batch_size=50", "data.eval_files=[]"])  # nothing evaluated
    CollieConfig.load(QUICKSTART, ["parallel.pp=2", "eval.batch_size=48"])


def test_cpu_offload_below_zero2_fails_at_load():
    with pytest.raises(ConfigError, match="parallel.cpu_offload=true needs parallel.zero_stage 2 or 3"):
        CollieConfig.load(QUICKSTART, ["parallel.cpu_offload=true", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="parallel.dp > 1"):
        CollieConfig.load(QUICKSTART, ["parallel.cpu_offload=true", "parallel.zero_stage=3", "parallel.dp=1",
                                       "parallel.tp=2"])


def test_hsdp_rules_fail_at_load_and_at_launch(monkeypatch):
    """parallel.dp_replicate (HSDP) needs ZeRO-2/3, the native engine and a divisor of dp (at load when dp is
    given, at launch when dp=-1 is resolved from the world size)."""
    with pytest.raises(ConfigError, match=r"parallel.dp_replicate=2 .* needs parallel.zero_stage 2 or 3 \(got 0\)"):
        CollieConfig.load(QUICKSTART, ["parallel.dp_replicate=2"])
    with pytest.raises(ConfigError, match="parallel.dp_replicate=2 .HSDP. needs parallel.engine=native"):
        CollieConfig.load(QUICKSTART, ["parallel.dp_replicate=2", "parallel.engine=deepspeed",
                                       "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="parallel.dp_replicate=3 does not divide parallel.dp=4"):
        CollieConfig.load(QUICKSTART, ["parallel.dp_replicate=3", "parallel.dp=4", "parallel.zero_stage=3"])
    CollieConfig.load(QUICKSTART, ["parallel.dp_replicate=3", "parallel.zero_stage=3"])  # dp=-1: at launch
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="parallel.dp_replicate=3 does not divide parallel.dp=4"):
        init_parallel(ParallelConfig(dp_replicate=3, zero_stage=3), "cpu")


def test_deepspeed_without_torchrun_is_one_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="parallel.engine=deepspeed needs a torchrun launch") as error:
        init_parallel(ParallelConfig(engine="deepspeed"), "cpu")
    assert "\n" not in str(error.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_parallel(ParallelConfig(engine="deepspeed"), "cpu").world_size == 1


# --- at run time: the same rules ---------------------------------------------------------------------------

def test_pipeline_runner_names_the_batch_key_of_training_or_evaluation():
    runner = PipelineRunner.__new__(PipelineRunner)  # the check runs before any stage is touched
    runner.n_microbatches = 4
    with pytest.raises(ConfigError, match="eval.batch_size=6"):
        runner._run(False, torch.zeros(6, 8, dtype=torch.long), None, None)
    with pytest.raises(ConfigError, match="train.micro_batch_size=6"):
        runner._run(True, torch.zeros(6, 8, dtype=torch.long), None, None)


def test_zero_below_2_refuses_offload_before_wrapping():
    with pytest.raises(ConfigError, match="parallel.zero_stage 2 or 3"):
        apply_data_parallel(None, None, 1, cpu_offload=True)


# --- config load, estimator and planner agree --------------------------------------------------------------

def loads(**values) -> bool:
    overrides = [f"parallel.{k}={v}" for k, v in values.items() if k != "optimizer"]
    try:
        CollieConfig.load(QUICKSTART, [f"optim.name={values['optimizer']}", "train.micro_batch_size=8", *overrides])
    except ConfigError:
        return False
    return True


def estimates(**values) -> bool:
    try:
        Setup(micro_batch_size=8, seq_len=64, **values)
    except ConfigError:
        return False
    return True


GRID = list(itertools.product(("adamw", "lomo", "adalomo", "sophia"), (0, 1, 2, 3), (1, 2),
                              ("native", "deepspeed"), (False, True)))


@pytest.mark.parametrize("optimizer, zero, pp, engine, offload", GRID)
def test_config_load_and_estimator_agree(optimizer, zero, pp, engine, offload):
    values = dict(optimizer=optimizer, dp=2, pp=pp, zero_stage=zero, engine=engine, cpu_offload=offload)
    assert loads(**values) == estimates(**values)


@pytest.mark.parametrize("zero, replicas, engine",
                         list(itertools.product((0, 1, 2, 3), (2, 3, 4), ("native", "deepspeed"))))
def test_config_load_and_estimator_agree_on_hsdp(zero, replicas, engine):
    values = dict(optimizer="adamw", dp=4, dp_replicate=replicas, zero_stage=zero, engine=engine)
    assert loads(**values) == estimates(**values) == (zero >= 2 and replicas == 2 and engine == "native")


@pytest.mark.parametrize("optimizer", ["adamw", "lomo", "adalomo", "sophia"])
def test_planner_proposes_exactly_what_config_load_accepts(optimizer):
    args, accepted = load_card("tiny"), {}
    for pp in (1, 2):
        base = Setup(optimizer=optimizer, micro_batch_size=1, seq_len=64)
        rows = plan(args, 2 * pp, 1e6, base=base, global_batch=16, checkpointing=("none",), keep="all")
        proposed = {r.setup.zero_stage for r in rows if (r.setup.dp, r.setup.tp, r.setup.pp) == (2, 1, pp)}
        accepted[pp] = {z for z in range(4) if loads(optimizer=optimizer, dp=2, pp=pp, zero_stage=z)}
        assert proposed == accepted[pp], (optimizer, pp)
    if optimizer in ("lomo", "adalomo"):  # the runtime's rule: fused optimizers at ZeRO 0, 2 and 3, not under pp
        assert accepted == {1: {0, 2, 3}, 2: set()}


# --- model-shape rules, stage splits, launcher ------------------------------------------------------------

def args(**overrides):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8)
    return ModelArgs(**{**base, **overrides})


def test_world_size_must_equal_the_product_of_degrees():
    with pytest.raises(ConfigError, match=r"world size 4 ≠ parallel.dp=1 × parallel.tp=2 × parallel.pp=1 = 2; set parallel.dp=2 or launch "
                                          r"with --nproc_per_node 2"):
        resolve_degrees(ParallelConfig(dp=1, tp=2), 4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp=2"):
        resolve_degrees(ParallelConfig(tp=2), 3)
    assert resolve_degrees(ParallelConfig(tp=2, pp=2), 8) == (2, 2, 2)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.engine=deepspeed", "parallel.tp=2"], "parallel.engine=deepspeed runs data parallelism only"),
    (["parallel.engine=deepspeed", "optim.name=sophia"], "optim.name=sophia refreshes its Hessian"),
    (["parallel.engine=deepspeed", "optim.name=adalomo"], "parallel.engine=deepspeed runs its own"),
])
def test_deepspeed_engine_rejects_what_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CollieConfig.load(QUICKSTART, overrides)


@pytest.mark.parametrize("overrides, tp, message", [
    ({}, 3, "parallel.tp=3 does not divide num_attention_heads=8; choose 1, 2, 4 or 8"),
    ({"num_attention_heads": 24, "hidden_size": 96}, 3, "parallel.tp=3 does not divide num_key_value_heads=8; "
                                                         "choose 1, 2, 4 or 8"),
    ({"vocab_size": 130}, 4, "parallel.tp=4 does not divide vocab_size=130; choose 1, 2, 5, 10, 13, 26, 65 or 130"),
    ({"num_key_value_heads": 2}, 4, "parallel.tp=4 exceeds num_key_value_heads=2.*choose 1 or 2"),
])
def test_tensor_parallel_degree_must_divide_heads_and_vocab(overrides, tp, message):
    with pytest.raises(ConfigError, match=message):
        validate_model_for_layout(args(**overrides), ParallelConfig(tp=tp))


def test_pipeline_needs_enough_layers_and_valid_boundaries():
    with pytest.raises(ConfigError, match="parallel.pp=8 needs at least 8 decoder layers.*num_hidden_layers=4"):
        validate_model_for_layout(args(), ParallelConfig(pp=8))
    with pytest.raises(ConfigError, match="interleaved_1f1b.*needs at least 8 decoder layers"):
        validate_model_for_layout(args(), ParallelConfig(pp=4, pp_schedule="interleaved_1f1b"))
    with pytest.raises(ConfigError, match="strictly increasing"):
        validate_model_for_layout(args(), ParallelConfig(pp=2, pp_boundaries=[4]))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        validate_model_for_layout(args(tie_word_embeddings=True), ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="pp_microbatches=1 is fewer than parallel.pp=2"):
        rules.check_microbatches(1, 2, "1f1b")
    validate_model_for_layout(args(), ParallelConfig(pp=2, tp=8, pp_boundaries=[1]))


def test_stage_splits():
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(4, 2, boundaries=[1]) == [range(0, 1), range(1, 4)]
    # balanced: a large embedding on the first stage and a large head on the last push layers to the middle
    sizes = [30, 10, 10, 10, 10, 10, 10, 30]
    assert split_layers(6, 3, "balanced", layer_sizes=sizes) == [range(0, 1), range(1, 5), range(5, 6)]
    assert split_layers(4, 4, "balanced", layer_sizes=[1, 1, 1, 1, 1, 1]) == [range(i, i + 1) for i in range(4)]


def test_launcher_reports_the_failing_rank(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit('rank one is broken')\n"
                      "time.sleep(30)\n")
    with pytest.raises(DistributedRunError, match="(?s)rank 1 of 2 exited with code 1.*rank one is broken"):
        run_distributed(str(script), 2, timeout_s=20)
