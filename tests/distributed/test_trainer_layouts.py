"""The Trainer in parallel layouts, beyond the end-to-end matrix (test_layout_matrix.py): resuming a DeepSpeed
checkpoint, and generation metrics other than exact match under pipeline parallelism.

Each run trains the tiny quickstart model for a few steps from the shipped data with the same global batch
(``train.micro_batch_size`` is per data-parallel rank, so dp=2 halves it). AdamW's eps is 1e-5, as in harness.py:
with 1e-8 fp32 summation-order noise in near-zero gradients turns into lr-sized steps.
"""
import json
import os

import pytest
import torch

from collie.config import CollieConfig
from collie.distributed.launch import run_distributed
from collie.trainer import Trainer

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
GLOBAL_BATCH, LOSS_RTOL = 8, 1e-5
COMMON = [
    "model.arch={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}", "train.max_steps=4",
    "train.log_every=1", "train.progress_bar=false", "checkpoint.save_final=false", "eval.before_training=false",
    "eval.every_steps=0", "eval.metrics=[perplexity]", "eval.max_batches=2", "eval.batch_size=4",
    "optim.warmup_steps=0", "optim.scheduler=constant", "optim.args={eps: 1e-5}", "monitor.sinks=[jsonl]", "data.shuffle=false",
    f"data.train_files=[{ROOT}/data/quickstart/train.jsonl]", f"data.eval_files=[{ROOT}/data/quickstart/eval.jsonl]",
    f"data.tokenizer={ROOT}/data/quickstart/tokenizer.model",
]
LAYOUTS = {
    "dp2": ["parallel.dp=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}"],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2", "parallel.pp_microbatches=2"],
    "zero3": ["parallel.dp=2", "parallel.zero_stage=3", f"train.micro_batch_size={GLOBAL_BATCH // 2}"],
    # DeepSpeed's ZeRO engine, the alternative to the native one (installed with the deepspeed / dev extras)
    "deepspeed_zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1", f"train.micro_batch_size={GLOBAL_BATCH // 2}"],
    "deepspeed_zero2_ga2": ["parallel.engine=deepspeed", "parallel.zero_stage=2", "train.grad_accum_steps=2",
                            f"train.micro_batch_size={GLOBAL_BATCH // 4}"],
    "deepspeed_zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3", f"train.micro_batch_size={GLOBAL_BATCH // 2}"],
}


def losses(output_dir) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


def train(output_dir, *overrides, world: int = 1, module: str = "collie"):
    """One process in this process, else ``python -m collie train`` (or ``-m collie.train``) on ``world`` ranks."""
    args = [*COMMON, f"train.micro_batch_size={GLOBAL_BATCH}", f"train.output_dir={output_dir}", *overrides]
    if world == 1:
        return Trainer(CollieConfig.load(QUICKSTART, args)).fit()
    command = [QUICKSTART, *args] if module == "collie.train" else ["train", QUICKSTART, *args]
    run_distributed(module, world, command, timeout_s=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    results = train(out)
    return losses(out), results


def test_deepspeed_checkpoint_resumes_and_converts(reference, tmp_path):
    """The DeepSpeed engine writes its partitioned files into collie's atomic step directory; resuming continues
    the uninterrupted loss sequence and `collie convert` exports the ZeRO-3 shards as one HF model."""
    pytest.importorskip("deepspeed")
    from collie.cli import main
    from collie.models import from_pretrained
    out, layout = tmp_path / "run", LAYOUTS["deepspeed_zero3"]
    train(out, *layout, "train.max_steps=2", "checkpoint.every_steps=2", world=2)
    train(out, *layout, "checkpoint.resume=auto", "checkpoint.save_final=true", world=2)
    expected, _ = reference
    got = losses(out)
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"step {step}: {a} vs uninterrupted {b}"
    assert main(["convert", str(out / "checkpoints" / "step-00000004"), str(tmp_path / "hf")]) == 0
    exported, final = from_pretrained(tmp_path / "hf"), from_pretrained(out / "final")
    for (name, a), b in zip(exported.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name


def test_generation_metrics_run_under_pipeline_parallelism(tmp_path):
    """eval.metrics with generation (exact_match, bleu) under pp: the pipeline's stages produce each token."""
    metrics = ["eval.metrics=[perplexity,exact_match,bleu]", "eval.max_new_tokens=4", "train.max_steps=2"]
    single = train(tmp_path / "single", *metrics)
    train(tmp_path / "pp2", *metrics, *LAYOUTS["pp2"], world=2)
    rows = [json.loads(line) for line in open(tmp_path / "pp2" / "metrics.jsonl")]
    final = [r for r in rows if "eval/exact_match" in r][-1]
    for key in ("perplexity", "exact_match", "bleu"):
        assert final[f"eval/{key}"] == pytest.approx(single[key], rel=1e-5), key
