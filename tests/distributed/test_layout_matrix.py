"""Every layout, end to end: ``collie train`` under torchrun (gloo) trains, evaluates before, during and after
training (perplexity and exact match of greedy generations), checkpoints mid-run and at the end and exports
``final/``; every result must be the one-process run's: the losses and gradient norms of each step, the evaluation
results, the exported weights, ``collie convert`` of the mid-run checkpoint and ``collie generate`` of ``final/``.
A run that hangs fails at its timeout. LoRA, AdaLomo and packed documents run on a representative subset of
layouts, each newer family trains LoRA adapters with LOMO or AdaLomo in one layout, the MoE family trains with
AdaLomo and with LoRA on its experts, and a checkpoint saved in one layout resumes in another.

Tolerances: the layouts sum the same fp32 values in other orders (tp splits the matmuls, dp the batch, pp nothing),
which differs by ~1e-7 relative at step 1 and, through 4 AdamW steps (eps 1e-5 as in harness.py: with 1e-8 the
rounding of near-zero gradients turns into lr-sized updates), by at most ~2e-6 in losses and weights in one layout
and ~7e-6 in a run resumed in a second layout (seen): 3e-5. The gradient norm is the most sensitive figure: Adam
divides by sqrt(v), so weight differences of ~1e-6 move the norm of the next gradient by up to 6e-5 relative
(seen at step 4 after a resume in another layout): 2e-4.
HSDP layouts ("dp2x2_*": 2 replicas × 2 shards) shard within a replica and all-reduce across replicas.
The 8-rank layouts (dp2×tp2×pp2, HSDP with tp or with pp) are opt-in: COLLIE_TEST_8RANK=1. A run costs ~45 s on
2 CPU cores (torchrun, imports, 4 steps, 3 evaluations with generation, export, convert), so CI runs the CORE
entries — every parallel dimension, engine and composition at least once, each newer feature once — and
COLLIE_TEST_FULL_MATRIX=1 runs every entry (what the same code paths meet in other combinations).
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from collie.cli import main
from collie_torchrun import torchrun_collie

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
GLOBAL_BATCH, STEPS, RUN_TIMEOUT_S = 8, 4, 300
LOSS_RTOL, GRAD_NORM_RTOL, WEIGHT_ATOL = 3e-5, 2e-4, 1e-5
PROMPT = "Is 47 even or odd?"  # collie generate wraps it in the chat template the run trained with
COMMON = [
    "model.arch={num_hidden_layers: 4, hidden_size: 64, intermediate_size: 128}", f"train.max_steps={STEPS}",
    "train.log_every=1", "train.progress_bar=false", "optim.warmup_steps=0", "optim.scheduler=constant",
    "data.shuffle=false", "eval.before_training=true", "eval.every_steps=2", "eval.max_batches=2",
    "eval.batch_size=8", "eval.max_new_tokens=4", "eval.metrics=[perplexity, exact_match]",
    "checkpoint.every_steps=2", "checkpoint.keep_last=3", "monitor.sinks=[jsonl]", "parallel.timeout_s=120",
    f"data.train_files=[{ROOT}/data/quickstart/train.jsonl]", f"data.eval_files=[{ROOT}/data/quickstart/eval.jsonl]",
    f"data.tokenizer={ROOT}/data/quickstart/tokenizer.model",
]
# what the run trains: the optimizer (and PEFT) of the one-process reference it is compared with
FEATURES = {
    "adamw": ["optim.name=adamw", "optim.args={eps: 1e-5}"],
    "lora": ["optim.name=adamw", "optim.args={eps: 1e-5}", "peft.method=lora", "optim.lr=1e-2"],
    "adalomo": ["optim.name=adalomo", "optim.lr=1e-2"],
    # packed conversations, each attending only to itself (per-document attention, no dense mask)
    "packed": ["optim.name=adamw", "optim.args={eps: 1e-5}", "data.pack=true", "data.document_masking=true"],
    # other families: QK-norm with head_dim != hidden / heads; Phi-3's fused checkpoint layout and sliding window
    "qwen3": ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=qwen3", "model.arch.qk_norm=true",
              "model.arch.head_dim=24"],
    "phi3": ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=phi3",
             "model.arch.sliding_window=16"],
    # sandwich norms, GeGLU, scaled embeddings, soft-capped scores and logits, alternating sliding/full layers
    "gemma2": ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=gemma2",
               "model.arch.sandwich_norms=true", "model.arch.scale_embeddings=true",
               "model.arch.hidden_act=gelu_pytorch_tanh", "model.arch.sliding_window=16",
               "model.arch.attn_logit_softcapping=5.0", "model.arch.final_logit_softcapping=3.0"],
    # routed experts (4, top-2, dropless); the router losses are per micro-batch statistics, which layouts that
    # split the batch differently compute over other tokens, so they are off here (tests/test_moe.py checks them)
    "mixtral": ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=mixtral",
                "model.arch.num_experts=4", "model.arch.router_aux_loss_coef=0"],
    # Gemma 3: Gemma 2's block without soft-capping, with QK-norm and a rotary base of the sliding layers' own
    "gemma3": ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=gemma3",
               "model.arch.qk_norm=true", "model.arch.sandwich_norms=true", "model.arch.scale_embeddings=true",
               "model.arch.hidden_act=gelu_pytorch_tanh", "model.arch.sliding_window=16",
               "model.arch.rope_local_theta=100.0"],
}
FEATURES["lomo"] = ["optim.name=lomo", "optim.lr=1e-2"]
# a family trained with a fused optimizer ("<family>_adalomo"), with LoRA ("<family>_lora") or with LoRA adapters
# updated by a fused optimizer ("<family>_lora_lomo", "<family>_lora_adalomo")
for family in ("qwen3", "phi3", "gemma2", "gemma3", "mixtral"):
    architecture = FEATURES[family][2:]
    FEATURES[f"{family}_adalomo"] = [*architecture, *FEATURES["adalomo"]]
    FEATURES[f"{family}_lora"] = [*architecture, *FEATURES["lora"]]
    for fused in ("lomo", "adalomo"):
        FEATURES[f"{family}_lora_{fused}"] = [*architecture, "peft.method=lora", *FEATURES[fused]]
for feature in ("phi3_lora", "phi3_lora_lomo", "phi3_lora_adalomo"):  # Phi-3 checkpoints pack q/k/v and gate/up
    FEATURES[feature] += ["peft.target_modules=[o_proj, down_proj]"]
# routed experts with LoRA factors of their own (peft.lora_experts) next to attention factors; final/ is merged
FEATURES["mixtral_lora_experts"] = [*FEATURES["mixtral_lora"], "peft.lora_experts=true",
                                    "peft.target_modules=[q_proj, v_proj, gate_proj, down_proj]"]
# MoE with a fused optimizer. A router row of an expert that no token chooses gets a gradient of rounding noise
# (~1e-10), which AdaLomo's factored normalisation (eps 1e-30) would scale into an lr-sized update that differs
# between layouts (as AdamW's eps 1e-8 would, above): eps 1e-16 keeps such rows still, far below real g² (>1e-12)
FEATURES["mixtral_adalomo"] = [*FEATURES["mixtral"][2:], *FEATURES["adalomo"], "optim.args={eps: [1.0e-16, 1.0e-3]}"]
# a shared expert beside the routed ones, with both router losses: layouts that keep every micro-batch's tokens
# together (tp) compute the one-process router statistics
FEATURES["qwen2_moe"] = ["optim.name=adamw", "optim.args={eps: 1e-5}", "model.arch.architecture=qwen2_moe",
                         "model.arch.num_experts=4", "model.arch.moe_intermediate_size=64",
                         "model.arch.shared_expert_intermediate_size=96", "model.arch.router_aux_loss_coef=0.02",
                         "model.arch.router_z_loss_coef=0.001"]
# name -> (ranks, data-parallel degree, layout overrides)
LAYOUTS = {
    "dp2": (2, 2, ["parallel.dp=2"]),
    "dp2_zero1": (2, 2, ["parallel.dp=2", "parallel.zero_stage=1"]),
    "dp2_zero2": (2, 2, ["parallel.dp=2", "parallel.zero_stage=2"]),
    "dp2_zero3": (2, 2, ["parallel.dp=2", "parallel.zero_stage=3"]),
    "tp2_sp": (2, 1, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2_gpipe": (2, 1, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": (2, 1, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2_interleaved": (2, 1, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]),
    "tp2_pp2": (4, 1, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2_tp2_zero3": (4, 2, ["parallel.dp=2", "parallel.tp=2", "parallel.zero_stage=3"]),
    "dp2_pp2_zero0": (4, 2, ["parallel.dp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
    "dp2_pp2_zero2": (4, 2, ["parallel.dp=2", "parallel.pp=2", "parallel.zero_stage=2",
                             "parallel.pp_microbatches=2"]),
    "dp2_pp2_zero3": (4, 2, ["parallel.dp=2", "parallel.pp=2", "parallel.zero_stage=3",
                             "parallel.pp_microbatches=2"]),
    # HSDP: 2 replicas × 2 shards (ZeRO within a replica, gradients all-reduced across replicas)
    "dp2x2_zero2": (4, 4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero_stage=2"]),
    "dp2x2_zero3": (4, 4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero_stage=3"]),
    # context parallel: each sequence split over 2 ranks (k/v all-gathered), alone and with dp2 ZeRO-3 (dp × cp)
    "cp2": (2, 1, ["parallel.cp=2"]),
    # ... with activation checkpointing: backward recomputes the split attention (the shard outlives the forward)
    "cp2_ckpt": (2, 1, ["parallel.cp=2", "model.activation_checkpointing=full"]),
    "cp2_dp2": (4, 2, ["parallel.dp=2", "parallel.cp=2", "parallel.zero_stage=3"]),
    # ... and with tensor + sequence parallelism: each cp rank's share split again over the tp ranks
    "cp2_tp2_sp": (4, 1, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    # ... and across pipeline stages: every stage's attention gathers k/v over the cp ranks of the stage
    "cp2_pp2": (4, 1, ["parallel.cp=2", "parallel.pp=2", "parallel.pp_microbatches=2"]),
    "deepspeed_zero1": (2, 2, ["parallel.engine=deepspeed", "parallel.zero_stage=1"]),
    "deepspeed_zero2": (2, 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    "deepspeed_zero3": (2, 2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"]),
    "dp2_tp2_pp2": (8, 2, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3",
                           "parallel.pp_microbatches=2"]),
    # HSDP composed with tp (2-D FSDP mesh + tp: 3-D parameters) and with pipeline stages
    "dp2x2_tp2_zero3": (8, 4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.tp=2", "parallel.zero_stage=3"]),
    "dp2x2_pp2_zero2": (8, 4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.pp=2", "parallel.zero_stage=2",
                               "parallel.pp_microbatches=2"]),
    # expert parallel (MoE only): ep ranks carved from dp hold different experts and exchange tokens by all-to-all
    "dp2_ep2": (2, 2, ["parallel.dp=2", "parallel.ep=2"]),
    "dp2_ep2_zero3": (2, 2, ["parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=3"]),
    "dp4_ep2_zero1": (4, 4, ["parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1"]),
    # ... with tensor parallel attention (the MoE blocks replicated over tp, experts split over the dp ranks of
    # each tp rank) and with pipeline stages (the stage's experts split over the dp ranks of the stage)
    "dp2_tp2_ep2_zero3": (4, 2, ["parallel.dp=2", "parallel.tp=2", "parallel.ep=2", "parallel.zero_stage=3",
                                 "parallel.sequence_parallel=true"]),
    "dp2_pp2_ep2": (4, 2, ["parallel.dp=2", "parallel.pp=2", "parallel.ep=2", "parallel.pp_microbatches=2"]),
}
# every layout once with AdamW (cp2 alone runs with the features below), then features where they meet a layout's code
MATRIX = [(name, "adamw") for name in LAYOUTS if "_ep" not in name and name != "cp2"] + [
    ("tp2_sp", "lora"), ("pp2_1f1b", "lora"), ("dp2_zero3", "lora"),
    ("dp2_zero2", "adalomo"), ("dp2_zero3", "adalomo"), ("tp2_sp", "adalomo"),
    ("tp2_sp", "packed"), ("pp2_1f1b", "packed"), ("dp2x2_zero3", "adalomo"),
    ("tp2_sp", "qwen3"), ("pp2_1f1b", "qwen3"), ("tp2_sp", "phi3"),
    ("tp2_sp", "gemma2"), ("pp2_1f1b", "gemma2"),
]
MATRIX += [("dp2_zero3", "mixtral")]
MATRIX += [("cp2", "packed"), ("cp2", "gemma2"), ("cp2", "lora"), ("cp2", "adalomo")]
MATRIX += [("dp2_ep2_zero3", "mixtral"), ("dp4_ep2_zero1", "mixtral")]  # dp2_ep2: test_expert_parallel.py
# the newer dense families with LoRA adapters trained by LOMO or AdaLomo (one run covers both); MoE with AdaLomo on
# every weight and with LoRA on attention and experts, both split over ep ranks
MATRIX += [("tp2_sp", "qwen3_lora_adalomo"), ("dp2_zero3", "gemma2_lora_lomo"), ("tp2_sp", "gemma3_lora_adalomo"),
           ("dp2_zero3", "phi3_lora_lomo"), ("dp2_ep2_zero3", "mixtral_lora_experts")]
MATRIX += [("dp2_ep2_zero3", "mixtral_adalomo"), ("tp2_sp", "qwen2_moe"), ("dp2_tp2_ep2_zero3", "mixtral"),
           ("dp2_pp2_ep2", "mixtral")]
CORE = {("dp2_zero1", "adamw"), ("dp2_zero2", "adamw"), ("dp2_zero3", "adamw"), ("tp2_sp", "adamw"),
        ("pp2_interleaved", "adamw"), ("dp2_tp2_zero3", "adamw"), ("dp2_pp2_zero2", "adamw"),
        ("dp2x2_zero3", "adamw"), ("cp2_dp2", "adamw"), ("cp2_tp2_sp", "adamw"), ("cp2_pp2", "adamw"),
        ("deepspeed_zero3", "adamw"), ("tp2_sp", "lora"), ("dp2_zero3", "adalomo"), ("pp2_1f1b", "packed"),
        ("cp2", "packed"), ("tp2_sp", "gemma2"), ("dp2_zero3", "mixtral"), ("dp2_ep2_zero3", "mixtral_adalomo"),
        ("dp2_tp2_ep2_zero3", "mixtral"), ("dp2_pp2_ep2", "mixtral"), ("tp2_sp", "qwen3_lora_adalomo")}
assert CORE <= set(MATRIX)
# (saved in, resumed in): the mid-run checkpoint of the first continues in the second
RESUMES = [("dp2_pp2_zero2", "tp2_sp"), ("tp2_sp", "single"), ("dp2x2_zero3", "dp2_zero2"), ("cp2_dp2", "cp2")]


# --- running ------------------------------------------------------------------------------------------------

def overrides(out, feature: str, layout: str) -> list[str]:
    ranks, dp, extra = LAYOUTS.get(layout, (1, 1, []))
    return [*COMMON, *FEATURES[feature], f"train.micro_batch_size={GLOBAL_BATCH // dp}", f"train.output_dir={out}",
            *extra]


def collie_train(out, feature: str, layout: str, *extra) -> None:
    """``collie train`` on the layout's ranks under torchrun (in this process for one rank)."""
    args = ["train", QUICKSTART, *overrides(out, feature, layout), *extra]
    ranks = LAYOUTS.get(layout, (1,))[0]
    if ranks == 1:
        assert main(args) == 0
        return
    log = str(out) + ".log"
    code = torchrun_collie(args, ranks, log, RUN_TIMEOUT_S)
    assert code == 0, f"{layout}/{feature} exited with {code}:\n{open(log).read()[-5000:]}"


def collie_generate(model_dir) -> str:
    """``collie generate`` of an exported model, in this process (a subprocess per run costs an interpreter start)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    return out.getvalue()


def collie_convert(checkpoint, out) -> dict:
    assert main(["convert", str(checkpoint), str(out)]) == 0
    return load_file(os.path.join(out, "model.safetensors"))


def read_run(out) -> dict:
    """What a run produced: per-step losses and gradient norms, evaluations by step, the exported weights, the
    converted mid-run checkpoint and the generation of ``final/``."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    final = os.path.join(out, "final")
    weights = {}
    for name in ("model.safetensors", "adapter_model.safetensors", os.path.join("base_model", "model.safetensors")):
        if os.path.exists(os.path.join(final, name)):
            weights.update({f"{name}:{k}": v for k, v in load_file(os.path.join(final, name)).items()})
    return {"steps": {r["step"]: r for r in rows if "loss" in r},
            "evals": {r["step"]: r for r in rows if "eval/loss" in r},
            "final": weights,
            "converted": collie_convert(os.path.join(out, "checkpoints", "step-00000002"), str(out) + "-converted"),
            "generated": collie_generate(final)}


_references: dict = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run of a feature, once per module."""
    def get(feature: str) -> dict:
        if feature not in _references:
            out = tmp_path_factory.mktemp(f"single-{feature}")
            collie_train(out, feature, "single")
            _references[feature] = read_run(out)
        return _references[feature]
    return get


# --- comparing ----------------------------------------------------------------------------------------------

def assert_same_steps(got: dict, expected: dict, steps, where: str) -> None:
    assert sorted(got) == sorted(steps), f"{where}: steps {sorted(got)}"
    for step in steps:
        a, b = got[step], expected[step]
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"{where} step {step} loss"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=GRAD_NORM_RTOL), f"{where} step {step} grad norm"


def assert_same_weights(got: dict, expected: dict, where: str) -> None:
    assert got.keys() == expected.keys(), f"{where}: {sorted(got.keys() ^ expected.keys())[:4]}"
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=WEIGHT_ATOL, msg=lambda m: f"{where} {key}: {m}")


def assert_same_run(got: dict, expected: dict, where: str) -> None:
    assert_same_steps(got["steps"], expected["steps"], range(1, STEPS + 1), where)
    assert sorted(got["evals"]) == sorted(expected["evals"]) == [0, 2, 4], where
    for step, row in expected["evals"].items():
        assert got["evals"][step]["eval/loss"] == pytest.approx(row["eval/loss"], rel=LOSS_RTOL), f"{where} eval"
        assert got["evals"][step]["eval/exact_match"] == row["eval/exact_match"], f"{where} eval at {step}"
        assert got["evals"][step]["eval/samples"] == row["eval/samples"], f"{where} eval at {step}"
    assert_same_weights(got["final"], expected["final"], f"{where} final/")
    assert_same_weights(got["converted"], expected["converted"], f"{where} collie convert step-2")
    assert got["generated"] == expected["generated"], where


@pytest.mark.parametrize("layout, feature", MATRIX, ids=[f"{layout}-{feature}" for layout, feature in MATRIX])
def test_layout_end_to_end_equals_one_process(layout, feature, reference, tmp_path):
    if LAYOUTS[layout][0] == 8 and os.environ.get("COLLIE_TEST_8RANK") != "1":
        pytest.skip("8-rank run: set COLLIE_TEST_8RANK=1")
    if (layout, feature) not in CORE and os.environ.get("COLLIE_TEST_FULL_MATRIX") != "1":
        pytest.skip("beyond the CI core: set COLLIE_TEST_FULL_MATRIX=1")
    if layout.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    expected = reference(feature)
    collie_train(tmp_path / "run", feature, layout)
    assert_same_run(read_run(tmp_path / "run"), expected, f"{layout}/{feature}")


@pytest.mark.parametrize("saved_in, resumed_in", RESUMES, ids=[f"{a}-to-{b}" for a, b in RESUMES])
def test_checkpoint_resumes_in_another_layout(saved_in, resumed_in, reference, tmp_path):
    """Two steps in one layout, then steps 3 and 4 from its step-2 checkpoint in another: the uninterrupted
    one-process losses (constant learning rate)."""
    collie_train(tmp_path / "first", "adamw", saved_in, "train.max_steps=2", "eval.before_training=false")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-00000002"
    collie_train(tmp_path / "second", "adamw", resumed_in, f"checkpoint.resume={checkpoint}",
                 "eval.before_training=false")
    rows = [json.loads(line) for line in open(tmp_path / "second" / "metrics.jsonl")]
    got = {r["step"]: r for r in rows if "loss" in r}
    assert_same_steps(got, reference("adamw")["steps"], [3, 4], f"{saved_in} → {resumed_in}")
