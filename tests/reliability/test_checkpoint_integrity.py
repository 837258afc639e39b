"""Checkpoint integrity: every file is checksummed when saved; ``resume=auto`` skips a damaged or incomplete
checkpoint (naming it) and resumes the newest intact one with the uninterrupted run's losses; an explicit
``resume=DIR`` fails with a one-line CheckpointError; files and directories are fsynced before the rename;
pruning keeps the most recently written; a full disk says so and keeps the earlier checkpoints."""
import errno
import json
import os
import re
import shutil

import pytest
import torch

from collie.checkpoint import CheckpointManager
from collie.config import CollieConfig
from collie.errors import CheckpointError
from collie.trainer import Callback, Trainer
from reliability_helpers import QUICKSTART, losses_by_step, metric_rows, overrides

STEPS = 3


def config(out, *extra):
    return CollieConfig.load(QUICKSTART, overrides(out, f"train.max_steps={STEPS}", "data.eval_files=[]",
                                                   "checkpoint.every_steps=1", "checkpoint.keep_last=3", *extra))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 3-step run with checkpoints at steps 1, 2, 3: its directory, dataset and losses."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(config(out))
    trainer.fit()
    return out, trainer.train_dataset, losses_by_step(out)


def warnings_in_log(out) -> list[str]:
    """The WARNING lines of the run's train.log (the collie logger does not propagate to pytest's caplog)."""
    return [line for line in (out / "train.log").read_text().splitlines() if " WARNING " in line]


def copy_run(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved[0], out)
    return out, out / "checkpoints" / f"step-{STEPS:08d}"


def flip(path, offset=None, count=8):
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def distcp(checkpoint):
    return sorted(checkpoint.glob("*.distcp"))[0]


DAMAGE = {
    "flipped bytes in a .distcp": (lambda c: flip(distcp(c)), r"__0_0\.distcp does not match its blake2b"),
    "truncated .distcp": (lambda c: distcp(c).write_bytes(distcp(c).read_bytes()[:100]), r"__0_0\.distcp has 100"),
    "emptied .distcp": (lambda c: distcp(c).write_bytes(b""), r"__0_0\.distcp has 0 bytes"),
    "deleted .distcp": (lambda c: distcp(c).unlink(), r"__0_0\.distcp is missing"),
    "damaged .metadata": (lambda c: flip(c / ".metadata", offset=40), r"\.metadata does not match"),
    "flipped bytes in rng": (lambda c: flip(c / "rng_rank0.pt"), r"rng_rank0\.pt does not match"),
    "empty trainer_state.json": (lambda c: (c / "trainer_state.json").write_text(""), r"trainer_state\.json has 0"),
    "invalid trainer_state.json": (lambda c: flip(c / "trainer_state.json", offset=2, count=1),
                                   r"trainer_state\.json does not match"),
    "deleted trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), r"trainer_state\.json is missing"),
    "damaged manifest.json": (lambda c: (c / "manifest.json").write_text("{"), r"manifest\.json is damaged"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resume_auto_skips_a_damaged_checkpoint_and_resumes_the_previous_one(tmp_path, saved, case):
    damage, reason = DAMAGE[case]
    out, newest = copy_run(saved, tmp_path)
    damage(newest)
    trainer = Trainer(config(out, "checkpoint.resume=auto"), train_dataset=saved[1])
    assert trainer.state.step == STEPS - 1
    assert any("skipping" in m and str(newest) in m and re.search(reason, m) for m in warnings_in_log(out))
    trainer.fit()  # the recomputed step equals the uninterrupted run's, and is logged once
    assert losses_by_step(out)[STEPS] == pytest.approx(saved[2][STEPS], rel=1e-6)
    assert [r["step"] for r in metric_rows(out) if "loss" in r] == list(range(1, STEPS + 1))
    with pytest.raises(CheckpointError, match=f"{newest}.*{reason}") as error:  # once resaved at step 3: intact
        damage(newest)
        Trainer(config(out, f"checkpoint.resume={newest}"), train_dataset=saved[1])
    assert "\n" not in str(error.value)


def test_a_checkpoint_saved_before_checksums_loads_with_a_warning(tmp_path, saved):
    out, newest = copy_run(saved, tmp_path)
    (newest / "manifest.json").unlink()
    trainer = Trainer(config(out, "checkpoint.resume=auto"), train_dataset=saved[1])
    assert trainer.state.step == STEPS
    assert any("cannot be verified" in m and str(newest) in m for m in warnings_in_log(out))


def test_every_file_is_in_the_manifest(saved):
    checkpoint = saved[0] / "checkpoints" / f"step-{STEPS:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    on_disk = {p.name for p in checkpoint.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and {".metadata", "trainer_state.json", "rng_rank0.pt"} <= on_disk
    for name, entry in manifest["files"].items():
        assert entry["size"] == (checkpoint / name).stat().st_size


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    final = manager.save(7, {"model": {"w": torch.ones(3)}}, {"trainer": {"step": 7}})
    tmp = os.path.join(manager.root, ".tmp-step-00000007")
    written = {os.path.join(tmp, name) for name in os.listdir(final)}
    assert written <= set(synced), written - set(synced)
    assert tmp in synced and manager.root in synced  # the entries, then the rename


def test_pruning_keeps_the_most_recently_written(tmp_path):
    """A run that resumed step 2 of a directory whose newest checkpoint is step 10 writes 3, 4: they are kept."""
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (10, 2, 3, 4):
        manager.save(step, {"model": {"w": torch.full((2,), float(step))}}, {"trainer": {"step": step}})
    assert sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000004"]
    manager.save(1, {}, {"trainer": {"step": 1}})
    assert manager.latest() == manager.latest_intact() == str(tmp_path / "step-00000001")


class FullDiskAt(Callback):
    """From ``step`` on, a write of tensor data fails as on a full disk."""

    def __init__(self, step, monkeypatch, error):
        self.step, self.monkeypatch, self.error = step, monkeypatch, error

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            real_save = torch.save

            def save(obj, f, *args, **kwargs):
                if hasattr(f, "write") and torch.is_tensor(obj):  # DCP's shard streams, not the RNG file path
                    f.write(b"\0" * 16)
                    raise self.error
                return real_save(obj, f, *args, **kwargs)
            self.monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_earlier_checkpoints(tmp_path, saved, monkeypatch, error):
    out = tmp_path / "run"
    root = out / "checkpoints"
    with pytest.raises(CheckpointError, match=f"no space left on device .*step-00000002 in {root}") as raised:
        Trainer(config(out), train_dataset=saved[1], callbacks=[FullDiskAt(2, monkeypatch, error)]).fit()
    assert "\n" not in str(raised.value)
    assert os.listdir(root) == ["step-00000001"]  # the partial step-2 directory is gone
    monkeypatch.undo()
    trainer = Trainer(config(out, "checkpoint.resume=auto"), train_dataset=saved[1])
    assert trainer.state.step == 1
