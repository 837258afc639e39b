"""Monitors: throughput counts real tokens, MFU uses the right FLOPs and peak, and every sink writes its file."""
import csv
import glob
import json
import os
import struct
import sys
from types import SimpleNamespace

import pytest
import torch

from collie.config import CollieConfig
from collie.errors import ConfigError
from collie.monitor import Monitor, meters
from collie.monitor.sinks import build_sinks
from collie.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
PEAK_TFLOPS = 1e-4  # tiny, so that the CPU run has a visible MFU
REQUIRED = ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib")


def config(out, *overrides):
    cfg = CollieConfig.load(QUICKSTART, [
        "model.arch={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128}", "train.progress_bar=false",
        "checkpoint.save_final=false", "eval.before_training=false", "eval.metrics=[perplexity]",
        "eval.max_batches=1", "eval.batch_size=8", "train.micro_batch_size=8", f"train.output_dir={out}",
        *overrides])
    for attr in ("train_files", "eval_files"):
        setattr(cfg.data, attr, [os.path.join(ROOT, f) for f in getattr(cfg.data, attr)])
    cfg.data.tokenizer = os.path.join(ROOT, cfg.data.tokenizer)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three steps logged at steps 2 and 3 (log_every=2, and the last) to every sink, wandb offline."""
    out = tmp_path_factory.mktemp("monitored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(out / "wandb_dir"))
        mp.setenv("WANDB_SILENT", "true")
        os.makedirs(out / "wandb_dir")
        cfg = config(out, "train.max_steps=3", "train.log_every=2", f"monitor.peak_tflops={PEAK_TFLOPS}",
                     "monitor.sinks=[console, jsonl, csv, tensorboard, wandb]")
        trainer = Trainer(cfg)
        trainer.fit()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return SimpleNamespace(out=out, trainer=trainer, train=[r for r in rows if "loss" in r],
                           evals=[r for r in rows if "eval/loss" in r],
                           info=json.load(open(out / "run_info.json")))


def test_flops_per_token_counts_attention_and_skips_frozen_weight_gradients():
    n, layers, hidden, seq = 1_000_000, 4, 128, 64
    attention = 12 * layers * hidden * seq
    assert meters.flops_per_token(n, layers, hidden, seq) == 6 * n + attention
    # LoRA: forward 2N and input gradients 2N for every weight, weight gradients 2N only for the trainable ones
    assert meters.flops_per_token(n, layers, hidden, seq, trainable_params=10_000) == 4 * n + 2 * 10_000 + attention
    assert meters.flops_per_token(n, layers, hidden, seq, trainable_params=n) == 6 * n + attention


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Some New GPU", None)])
def test_device_peak_is_looked_up_by_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert meters.device_peak_tflops(torch.device("cuda")) == peak
    assert meters.device_peak_tflops(torch.device("cuda"), override=500.0) == 500.0
    assert meters.device_peak_tflops(torch.device("cpu")) is None


def test_mfu_is_achieved_flops_over_the_device_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    flops = meters.flops_per_token(1_100_000_000, 22, 2048, 2048)
    meter = meters.StepMeter(flops, meters.device_peak_tflops(torch.device("cuda")), world_size=8)
    result = meter.throughput(tokens=8 * 4 * 2048, step_time_s=0.5)  # 8 GPUs, 4 × 2048 tokens each
    assert result["tokens_per_s_per_gpu"] == pytest.approx(16384)
    assert result["mfu"] == pytest.approx(16384 * flops / 989e12)
    assert meters.StepMeter(flops, None, 1).throughput(100, 1.0)["mfu"] is None


def test_step_begin_waits_for_the_device_then_resets_its_peak(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    Monitor().on_step_begin(SimpleNamespace(device=torch.device("cuda", 0)))
    assert calls == ["synchronize", "reset"]


def test_cuda_memory_is_reported_in_gib(monkeypatch):
    for name, value in [("max_memory_allocated", 3 * 2**30), ("memory_allocated", 2**30),
                        ("memory_reserved", 2**31)]:
        monkeypatch.setattr(torch.cuda, name, lambda device=None, value=value: value)
    assert meters.memory_stats(torch.device("cuda", 0)) == {"peak_mem_gib": 3.0, "allocated_gib": 1.0,
                                                              "reserved_gib": 2.0}


def test_every_logged_step_lands_in_metrics_jsonl_with_the_monitor_keys(run):
    assert [r["step"] for r in run.train] == [2, 3]
    for row in run.train:
        for key in REQUIRED:
            assert row.get(key) is not None, key
        assert row["peak_mem_gib"] > 0 and row["step_time_s"] > 0 and row["lr"] > 0
    assert run.evals and run.evals[-1]["step"] == 3


def test_tokens_counted_exclude_padding(run):
    batches = run.trainer.train_batches()  # the same seeded order as the run
    steps = [next(batches) for _ in range(3)]
    for row in run.train:
        batch = steps[row["step"] - 1]
        real = int((batch["input_ids"] != run.trainer.tokenizer.pad_token_id).sum())
        assert row["num_tokens"] == int(batch["attention_mask"].sum()) == real
        assert row["num_tokens"] < batch["input_ids"].numel()  # the batch was padded
        assert row["tokens_per_s_per_gpu"] == pytest.approx(row["num_tokens"] / row["step_time_s"])


def test_mfu_of_the_run_uses_model_flops_and_the_configured_peak(run):
    args = run.trainer.model_args
    n = run.trainer.num_params
    flops = 6 * n + 12 * args.num_hidden_layers * args.hidden_size * 64  # quickstart data.seq_len
    assert run.info["flops_per_token"] == flops and run.info["num_trainable"] == n
    assert run.info["peak_tflops"] == PEAK_TFLOPS and run.info["world_size"] == 1
    for row in run.train:
        assert row["mfu"] == pytest.approx(row["tokens_per_s_per_gpu"] * flops / (PEAK_TFLOPS * 1e12))


def test_csv_sink_writes_train_and_eval_rows(run):
    rows = list(csv.DictReader(open(run.out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 3]
    for row, logged in zip(rows, run.train):
        assert float(row["loss"]) == pytest.approx(logged["loss"])
        assert float(row["tokens_per_s_per_gpu"]) == pytest.approx(logged["tokens_per_s_per_gpu"])
    evals = list(csv.DictReader(open(run.out / "eval_metrics.csv")))
    assert float(evals[-1]["eval/loss"]) == pytest.approx(run.evals[-1]["eval/loss"])


def test_console_sink_writes_a_compact_line_per_logged_step(run):
    log = open(run.out / "train.log").read()
    lines = [line for line in log.splitlines() if "| loss " in line]
    assert len(lines) == 2 and "step 2 | loss" in lines[0] and "tok/s/dev" in lines[0] and "mfu" in lines[0]


def test_tensorboard_sink_writes_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run.out / "tensorboard"))
    events.Reload()
    assert {"loss", "mfu", "tokens_per_s_per_gpu", "eval/loss"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in run.train], rel=1e-6)


def test_wandb_sink_writes_an_offline_run_with_the_logged_keys(run):
    files = glob.glob(str(run.out / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, "WANDB_DIR is where the offline run goes"
    history = read_wandb_history(files[0])
    assert [h["_step"] for h in history if "loss" in h] == [2, 3]
    logged = {k for h in history for k in h}
    assert set(REQUIRED) - {"step"} <= logged and "eval/loss" in logged
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in run.train])


@pytest.mark.parametrize("sink, module, extra", [("wandb", "wandb", "wandb"),
                                                 ("tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_a_sink_without_its_package_names_the_extra(tmp_path, monkeypatch, sink, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    cfg = config(tmp_path, f"monitor.sinks=[jsonl, {sink}]")
    with pytest.raises(ConfigError, match=rf"monitor.sinks: '{sink}' needs the {extra} package.*"
                                          rf"pip install -e '\.\[{extra}\]'"):
        build_sinks(cfg, str(tmp_path))


def read_wandb_history(path: str) -> list[dict]:
    """The history rows of an offline wandb run file: a 7-byte header, then LevelDB-log records (32 KiB
    blocks; each chunk has a 7-byte header: crc, length, type) holding ``wandb_internal.Record`` messages."""
    from wandb.proto import wandb_internal_pb2
    data, block, rows, pending = open(path, "rb").read(), 32768, [], b""
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
