"""Damaged inputs end in a clear collie error naming the file, and loading never runs code from a file:
truncated/garbled/pickled-payload checkpoint files (.distcp, .metadata, rng, trainer_state.json), a checkpoint of
another model shape, corrupted safetensors and .bin weights, and datasets with malformed records."""
import json
import os
import shutil

import pytest
import torch

from collie.cli import main
from collie.config import CollieConfig
from collie.errors import CheckpointError, DataError
from collie.models import from_pretrained
from collie.trainer import Trainer
from reliability_helpers import QUICKSTART, overrides


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def config(out, *extra):
    return CollieConfig.load(QUICKSTART, overrides(out, "train.max_steps=1", "data.eval_files=[]", *extra))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished one-step run: its checkpoint, its Hugging Face export and its tokenized data."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(config(out, "checkpoint.save_final=true"))
    trainer.fit()
    return out / "checkpoints" / "step-00000001", out / "final", trainer.train_dataset


def resume(tmp_path, saved, damage):
    """Copy the checkpoint, damage it, resume a Trainer from it. The copy has no manifest (as a checkpoint saved
    before checksums), so that the loader's own checks are what is tested (checksums: test_checkpoint_integrity)."""
    checkpoint = tmp_path / "step-00000001"
    shutil.copytree(saved[0], checkpoint)
    (checkpoint / "manifest.json").unlink()
    damage(checkpoint)
    Trainer(config(tmp_path / "run", f"checkpoint.resume={checkpoint}"), train_dataset=saved[2])


def truncate(path, keep=40):
    path.write_bytes(path.read_bytes()[:keep])


def distcp(checkpoint):
    return sorted(checkpoint.glob("*.distcp"))[0]


DAMAGE = {
    "truncated .distcp": (lambda c: truncate(distcp(c)), "cannot load checkpoint .*step-00000001"),
    "garbled .distcp": (lambda c: distcp(c).write_bytes(os.urandom(4096)), "cannot load checkpoint .*step-00000001"),
    "truncated .metadata": (lambda c: truncate(c / ".metadata"), "cannot load checkpoint .*step-00000001"),
    "missing .metadata": (lambda c: (c / ".metadata").unlink(), "cannot load checkpoint .*step-00000001"),
    "truncated rng": (lambda c: truncate(c / "rng_rank0.pt"), "rng_rank0.pt"),
    "rng of the wrong kind": (lambda c: torch.save({"gpu": 1}, c / "rng_rank0.pt"), "rng_rank0.pt.*not an RNG"),
    "truncated trainer_state.json": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json"),
    "trainer_state.json a list": (lambda c: (c / "trainer_state.json").write_text("[1, 2]"), "trainer_state.json"),
    "trainer_state.json without keys": (lambda c: (c / "trainer_state.json").write_text('{"trainer": {}}'),
                                        "trainer_state.json does not fit"),
    "trainer_state.json wrong values": (lambda c: _edit_state(c, trainer={"step": 1, "bogus": 2}),
                                        "trainer_state.json does not fit"),
}


def _edit_state(checkpoint, **changes):
    path = checkpoint / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_fails_with_a_checkpoint_error(tmp_path, saved, case):
    damage, message = DAMAGE[case]
    with pytest.raises(CheckpointError, match=message):
        resume(tmp_path, saved, damage)


def test_checkpoint_of_another_model_shape(tmp_path, saved):
    with pytest.raises(CheckpointError, match="step-00000001"):
        Trainer(config(tmp_path, f"checkpoint.resume={saved[0]}",
                       "model.arch={num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64}"),
                train_dataset=saved[2])


@pytest.mark.parametrize("target", [".metadata", "rng_rank0.pt"])
def test_a_pickled_payload_in_a_checkpoint_is_never_executed(tmp_path, saved, target):
    marker = tmp_path / "PWNED"

    def plant(checkpoint):
        if target == ".metadata":  # DCP itself would pickle.load this file
            (checkpoint / target).write_bytes(__import__("pickle").dumps(Payload(marker)))
        else:
            torch.save({"cpu": torch.get_rng_state(), "extra": Payload(marker)}, checkpoint / target)

    with pytest.raises(CheckpointError, match=target.replace(".", r"\.") if target != ".metadata" else "not allowed"):
        resume(tmp_path, saved, plant)
    assert not marker.exists()
    checkpoint = tmp_path / "step-00000001"
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == (2 if target == ".metadata" else 0)
    assert not marker.exists()


def hf_copy(tmp_path, saved):
    model_dir = tmp_path / "hf"
    shutil.copytree(saved[1], model_dir)
    return model_dir


@pytest.mark.parametrize("damage", ["truncated", "garbled header", "empty"])
def test_corrupted_safetensors_name_the_file(tmp_path, saved, damage):
    model_dir = hf_copy(tmp_path, saved)
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbled header": b"\xff" * 16 + data[16:],
                         "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(str(model_dir))


def test_pickled_payload_in_bin_weights_is_never_executed(tmp_path, saved):
    model_dir = hf_copy(tmp_path, saved)
    marker = tmp_path / "PWNED"
    (model_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        from_pretrained(str(model_dir))
    assert not marker.exists()


MALFORMED = {
    "broken JSON line": '{"messages": [{"role": "user", "content": "hi"}]\n{"oops"\n',
    "record not an object": '[1, 2, 3]\n',
    "missing field": '{"text": "no conversation here"}\n',
    "content not a string": '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_names_the_file(tmp_path, saved, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(MALFORMED[case])
    with pytest.raises(DataError, match="bad.jsonl"):
        Trainer(config(tmp_path / "run", f"data.train_files=[{bad}]"))
