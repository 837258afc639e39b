"""LoRA trains exactly like one process under tensor parallel (with and without sequence parallel), ZeRO-3,
pipeline parallel (2 ranks) and dp2×tp2 (4 ranks, gloo): same losses, same adapter weights, only the adapters
trainable."""
import os

import pytest
import torch

from collie.distributed.launch import run_distributed

import lora_rank

pytestmark = pytest.mark.distributed
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_rank.py")
LAYOUTS = ["tp2", "tp2_sp", "zero3", "pp2"]
FOUR_RANK_LAYOUTS = ["dp2_tp2"]


@pytest.fixture(scope="module")
def reference():
    return lora_rank.train("single")


@pytest.fixture(scope="module")
def ranks():
    """Every layout in one 2-rank launch."""
    return {2: run_distributed(RANK_SCRIPT, 2, LAYOUTS, timeout_s=60 + 30 * len(LAYOUTS)),
            4: run_distributed(RANK_SCRIPT, 4, FOUR_RANK_LAYOUTS, timeout_s=120)}


@pytest.mark.parametrize("layout", LAYOUTS + FOUR_RANK_LAYOUTS)
def test_lora_layout_matches_one_process(reference, ranks, layout):
    ranks = ranks[4 if layout in FOUR_RANK_LAYOUTS else 2]
    for rank in ranks:
        assert rank[layout]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    result = ranks[0][layout]
    if layout != "pp2":  # a pipeline rank holds only its stage's parameters
        assert result["trainable"] == reference["trainable"]
    assert all(".lora_" in name for name in result["trainable"])
    assert result["adapter"].keys() == reference["adapter"].keys()
    for name, value in reference["adapter"].items():
        torch.testing.assert_close(torch.tensor(result["adapter"][name]), torch.tensor(value),
                                   rtol=1e-5, atol=1e-5, msg=name)
