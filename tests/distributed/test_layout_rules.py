"""Impossible layouts fail with ConfigErrors that say what to choose, before any process starts; stage
splitting; the launcher stops at the first failing rank."""
import os

import pytest

from collie.config import ParallelConfig
from collie.distributed import resolve_degrees, split_layers, validate_model_for_layout
from collie.distributed.launch import DistributedRunError, run_distributed
from collie.distributed.pipeline import check_microbatches
from collie.errors import ConfigError
from collie.models import ModelArgs


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
    from collie.config import CollieConfig
    quickstart = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")
    with pytest.raises(ConfigError, match=message):
        CollieConfig.load(quickstart, overrides)


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
        check_microbatches(1, 2, "1f1b")
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
