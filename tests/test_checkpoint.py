"""Checkpoints: resume continues the same run, SIGTERM saves and stops, partial saves are ignored, bad ones fail."""
import json
import os
import signal

import pytest
import torch

from collie.errors import CheckpointError
from collie.trainer import Callback, Trainer
from test_trainer import config


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_step_end(self, trainer, metrics):
        self.values.append(metrics["loss"])


class SigtermAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def run(cfg, *callbacks):
    losses = Losses()
    trainer = Trainer(cfg, callbacks=[losses, *callbacks])
    trainer.fit()
    return trainer, losses.values


@pytest.mark.parametrize("optimizer", ["adamw", "adalomo"])
def test_sigterm_saves_and_resume_continues_the_same_losses(tmp_path, optimizer):
    common = ["train.max_steps=6", "optim.warmup_steps=2", "eval.before_training=false", f"optim.name={optimizer}"]
    _, whole = run(config(tmp_path / "whole", *common))
    stopped, head = run(config(tmp_path / "split", *common), SigtermAt(3))
    assert stopped.state.step == 3 and len(head) == 3
    assert os.path.isdir(tmp_path / "split" / "checkpoints" / "step-00000003")
    assert not (tmp_path / "split" / "final").exists()
    resumed, tail = run(config(tmp_path / "split", *common, "checkpoint.resume=auto"))
    assert resumed.state.step == 6
    assert head + tail == pytest.approx(whole, rel=1e-6)


def test_keep_last_and_partial_checkpoints(tmp_path):
    trainer, _ = run(config(tmp_path, "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                            "checkpoint.save_final=true"))
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-00000003", "step-00000004"]
    partial = root / ".tmp-step-00000005"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half written")
    trainer = Trainer(config(tmp_path, "train.max_steps=4", "checkpoint.resume=auto"))
    assert trainer.state.step == 4 and not partial.exists()
    state = json.load(open(root / "step-00000004" / "trainer_state.json"))
    assert state["trainer"]["step"] == 4 and state["data"]["samples_taken"] >= 4 * trainer.cfg.train.micro_batch_size


def test_resume_restores_weights_and_optimizer_state(tmp_path):
    trainer, _ = run(config(tmp_path, "train.max_steps=2", "checkpoint.save_final=true"))
    resumed = Trainer(config(tmp_path, "train.max_steps=4", "checkpoint.resume=auto"))
    for (name, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(trainer.optimizer.state.values(), resumed.optimizer.state.values()):
        for key in p:
            assert torch.equal(p[key], q[key]), key


def test_corrupted_or_mismatched_checkpoints_fail_clearly(tmp_path):
    run(config(tmp_path, "train.max_steps=1", "checkpoint.save_final=true"))
    path = tmp_path / "checkpoints" / "step-00000001"
    with pytest.raises(CheckpointError, match="step-00000001"):
        Trainer(config(tmp_path, "train.max_steps=2", "checkpoint.resume=auto",
                       "model.arch={num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64}"))
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            (path / name).write_bytes((path / name).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        Trainer(config(tmp_path, "train.max_steps=2", f"checkpoint.resume={path}"))
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        Trainer(config(tmp_path, "train.max_steps=2", f"checkpoint.resume={tmp_path}"))


def test_convert_checkpoint_to_hugging_face(tmp_path):
    from transformers import AutoModelForCausalLM

    from collie.cli import main
    trainer, _ = run(config(tmp_path, "train.max_steps=2", "checkpoint.save_final=true"))
    out = tmp_path / "hf"
    assert main(["convert", str(tmp_path / "checkpoints" / "step-00000002"), str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(hf(ids).logits, trainer.model(ids), rtol=1e-5, atol=1e-5)
    assert main(["convert", str(tmp_path), str(tmp_path / "x")]) == 2


def test_convert_of_a_lora_checkpoint_keeps_what_was_trained(tmp_path):
    """The merged model by default, the adapter with its base with --adapter: both give the trained logits."""
    from collie.cli import main
    from collie.models import from_pretrained
    from collie.peft import load_model_or_adapter
    trainer, _ = run(config(tmp_path, "train.max_steps=2", "peft.method=lora", "optim.lr=1e-2",
                            "peft.target_modules=[q_proj, v_proj, lm_head]", "checkpoint.save_final=true"))
    checkpoint = str(tmp_path / "checkpoints" / "step-00000002")
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        trained = trainer.model(ids)
        assert main(["convert", checkpoint, str(tmp_path / "merged")]) == 0
        merged = from_pretrained(tmp_path / "merged")(ids)
        assert main(["convert", checkpoint, str(tmp_path / "adapter"), "--adapter"]) == 0
        adapted = load_model_or_adapter(tmp_path / "adapter")(ids)
        base = from_pretrained(tmp_path / "adapter" / "base_model")(ids)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapted, trained, rtol=1e-5, atol=1e-5)
    assert (base - trained).abs().max() > 1e-3  # the adapter matters
    plain, _ = run(config(tmp_path / "plain", "train.max_steps=1", "checkpoint.save_final=true"))
    assert main(["convert", str(tmp_path / "plain" / "checkpoints" / "step-00000001"), str(tmp_path / "x"),
                 "--adapter"]) == 2
