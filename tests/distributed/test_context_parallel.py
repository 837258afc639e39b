"""Context-parallel attention (``collie.distributed.context_parallel``) equals full attention at 2 ranks: the
summed loss of the split sequence and the gradients summed over the cp ranks are those of one process on the
whole sequence — causal, right-padded to a multiple of 2·cp, packed documents, a sliding window, soft-capped
scores. The end-to-end runs (cp2, cp2×dp2 ZeRO-3 through ``collie train``) are in test_layout_matrix.py."""
import os

import pytest
import torch
import torch.nn.functional as F

from collie import layout_rules as rules
from collie.config import CollieConfig, ParallelConfig
from collie.data.pretrain import document_causal_mask, document_ids
from collie.distributed import resolve_degrees, validate_model_for_layout
from collie.distributed.context_parallel import SequenceShard, shard_positions
from collie.distributed.launch import run_distributed
from collie.errors import ConfigError
from collie.models import ModelArgs
from collie.models.attention_kernels import chunked_causal_attention

import cp_rank

pytestmark = pytest.mark.distributed
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cp_rank.py")
QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs", "quickstart.yaml")


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("packed, window, scale", [(False, None, None), (True, None, 0.2), (False, 5, None),
                                                   (True, 3, None), (True, 11, 0.3)],
                         ids=["causal", "documents_scaled", "window", "documents_window", "documents_long_window"])
def test_chunked_causal_attention_equals_masked_attention(dtype, atol, packed, window, scale):
    """Every rank's two chunks (cut at document starts when packed, into pieces no longer than the window),
    attended without a (query × key) mask and merged by log-sum-exp, give the outputs and (summed over ranks) the
    gradients of one masked SDPA over the whole rows; fp32: the merge rounds once per block of at most 8 keys × 4
    rows."""
    cp, chunk = 3, 8
    seq = 2 * cp * chunk
    positions = torch.arange(seq).repeat(2, 1)
    if packed:  # row 0: documents of 5, 20 and 23 tokens; row 1: 13 and 35
        positions[0] = torch.cat([torch.arange(5), torch.arange(20), torch.arange(23)])
        positions[1] = torch.cat([torch.arange(13), torch.arange(35)])
    mask = document_causal_mask(positions)
    if window is not None:
        index = torch.arange(seq)
        mask = mask & (index[None] > index[:, None] - window)
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, heads, seq, 16, generator=generator, dtype=dtype) for heads in (8, 4, 4, 8))
    expected = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*expected, attn_mask=mask, enable_gqa=True, scale=scale)
    reference.backward(grad)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    for rank in range(cp):
        held = shard_positions(seq, cp, rank)
        shard = SequenceShard(None, None, None, held, torch.arange(seq), None,
                              document_ids(positions) if packed else None)
        out = chunked_causal_attention(q[:, :, held], k, v, shard.query_segments(window), scale, window)
        out.backward(grad[:, :, held])
        torch.testing.assert_close(out, reference[:, :, held], atol=atol, rtol=0)
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got.grad, want.grad, atol=atol, rtol=0)


def test_shards_are_load_balanced():
    """2·cp chunks; rank r holds chunk r and chunk 2·cp−1−r; together every position once."""
    assert shard_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([shard_positions(24, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(24))
    # causal work (keys seen) is equal on every rank
    assert len({int((shard_positions(24, 3, r) + 1).sum()) for r in range(3)}) == 1


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(RANK_SCRIPT, 2, list(cp_rank.CASES), timeout_s=300)


@pytest.mark.parametrize("case", list(cp_rank.CASES))
def test_context_parallel_attention_equals_full_attention(ranks, case):
    # fp32: the split sums the same products in other blockings (~1e-7 relative). bf16 autocast: both runs round
    # every matmul output to 8 mantissa bits (2^-9 relative) in different blockings, through 2 layers: 2e-2
    rtol = 2e-2 if case == "autocast" else 1e-5
    for rank in ranks:
        result = rank[case]
        assert result["loss"] == pytest.approx(result["expected_loss"], rel=rtol)
        assert result["grad_diff"] < rtol * max(1.0, result["grad_max"]), \
            f"{case}: gradients differ by {result['grad_diff']} (largest {result['grad_max']})"
        assert result["unsplit_runs_whole"]
        assert result["masked"] == (case == "softcapped"), "causal SDPA needs no (query × key) mask"
    seq = cp_rank.CASES[case][1]
    assert ranks[0][case]["tokens"] == -(-seq // 4) * 2  # half of the sequence padded to a multiple of 4


# --- rules: what composes with cp in this slice, checked at load --------------------------------------------

CP_VIOLATIONS = [
    ((2, 1, 2, "native", "none", "collie", 0, True), "data.document_masking"),
    ((2, 1, 1, "deepspeed"), "parallel.engine=native"),
    ((2, 1, 1, "native", "prefix"), "peft.method=prefix"),
    ((2, 1, 1, "native", "none", "hf"), "model.backend=hf"),
    ((2, 1, 1, "native", "none", "collie", 64), "train.loss_chunk_size"),
]


@pytest.mark.parametrize("arguments, key", CP_VIOLATIONS, ids=[key for _, key in CP_VIOLATIONS])
def test_context_parallel_rules_name_the_key(arguments, key):
    with pytest.raises(ConfigError) as error:
        rules.check_context_parallel(*arguments)
    assert key in str(error.value) and "parallel.cp=2" in str(error.value)


def test_world_size_counts_cp_ranks():
    assert rules.resolve_dp(8, -1, 1, 1, cp=2) == 4
    assert resolve_degrees(ParallelConfig(cp=2, dp=2), 4) == (2, 1, 1)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 = 2; set parallel.dp=4 or launch with --nproc_per_node 2"):
        rules.resolve_dp(8, 1, 1, 1, cp=2)
    rules.check_context_parallel(4, tp=2, pp=2)  # with dp, ZeRO, tp and pp: nothing to refuse


def test_cp_config_loads_and_refuses_documents_under_pp_at_load():
    cfg = CollieConfig.load(QUICKSTART, ["parallel.cp=2", "parallel.zero_stage=3", "data.document_masking=true",
                                         "data.pack=true", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert (cfg.parallel.cp, cfg.parallel.tp) == (2, 2)
    assert CollieConfig.load(QUICKSTART, ["parallel.cp=2", "parallel.pp=2", "data.pack=true"]).parallel.pp == 2
    with pytest.raises(ConfigError, match="parallel.cp=2 with parallel.pp=2 cannot mask packed documents"):
        CollieConfig.load(QUICKSTART, ["parallel.cp=2", "parallel.pp=2", "data.pack=true",
                                       "data.document_masking=true"])


def test_moe_router_losses_are_refused_under_cp():
    args = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, architecture="mixtral", num_experts=4,
                     router_aux_loss_coef=0.01)
    with pytest.raises(ConfigError, match="parallel.cp=2: the router losses"):
        validate_model_for_layout(args, ParallelConfig(cp=2))


def test_longrope_is_refused_under_cp():
    """longrope switches factors on the largest position of the whole sequence, which no cp rank holds alone."""
    args = ModelArgs(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, architecture="phi3", max_position_embeddings=64,
                     rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                   "original_max_position_embeddings": 16})
    with pytest.raises(ConfigError, match="parallel.cp=2: longrope"):
        validate_model_for_layout(args, ParallelConfig(cp=2))
    validate_model_for_layout(args, ParallelConfig())
