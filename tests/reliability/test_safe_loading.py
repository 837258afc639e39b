"""Loading never runs code, on every engine and load path (resume, ``collie convert``): a pickled payload (an
object whose unpickling creates a marker file) is planted in every file a path reads — DCP's ``.distcp`` and
``.metadata``, ``rng_rank*.pt``, DeepSpeed's model and optimizer states — and the manifest re-signed, as a crafted
checkpoint would be. Each ends in a CheckpointError naming the file, and the marker never appears."""
import io
import os
import pickle
import shutil

import pytest
import torch

from collie.checkpoint import integrity
from collie.cli import main
from collie.config import CollieConfig
from collie.distributed.launch import DistributedRunError, run_distributed
from collie.errors import CheckpointError
from collie.trainer import Trainer
from reliability_helpers import QUICKSTART, WORKER, overrides, worker_args


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def resign(checkpoint) -> None:
    """A manifest that matches the planted files."""
    files = {rel: integrity.file_digest(os.path.join(checkpoint, rel)) for rel in integrity.list_files(checkpoint)
             if rel != integrity.MANIFEST}
    integrity.write_manifest(str(checkpoint), files)


def plant_in_distcp(checkpoint, marker) -> None:
    """Every tensor item of the .distcp files becomes a torch.save'd payload (.metadata points at them)."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    payload = io.BytesIO()
    torch.save({"x": Payload(marker)}, payload)
    data = payload.getvalue()
    contents = {}
    for index, info in metadata.storage_data.items():
        start = len(contents.get(info.relative_path, b""))
        contents[info.relative_path] = contents.get(info.relative_path, b"") + data
        metadata.storage_data[index] = type(info)(info.relative_path, start, len(data))
    for name, content in contents.items():
        (checkpoint / name).write_bytes(content)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


PLANT = {
    ".distcp": plant_in_distcp,
    ".metadata": lambda c, m: (c / ".metadata").write_bytes(pickle.dumps(Payload(m))),
    "rng_rank0.pt": lambda c, m: torch.save({"cpu": torch.get_rng_state(), "x": Payload(m)}, c / "rng_rank0.pt"),
}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    cfg = CollieConfig.load(QUICKSTART, overrides(out, "train.max_steps=1", "data.eval_files=[]",
                                                  "checkpoint.save_final=true"))
    trainer = Trainer(cfg)
    trainer.fit()
    return out / "checkpoints" / "step-00000001", trainer.train_dataset


@pytest.mark.parametrize("target", sorted(PLANT))
def test_native_load_paths_refuse_a_payload(tmp_path, native, target):
    marker, checkpoint = tmp_path / "PWNED", tmp_path / "step-00000001"
    shutil.copytree(native[0], checkpoint)
    PLANT[target](checkpoint, marker)
    resign(checkpoint)
    cfg = CollieConfig.load(QUICKSTART, overrides(tmp_path / "run", f"checkpoint.resume={checkpoint}"))
    with pytest.raises(CheckpointError, match="not allowed|Unsupported|rng_rank0.pt|cannot load checkpoint"):
        Trainer(cfg, train_dataset=native[1])
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == (0 if target == "rng_rank0.pt" else 2)
    assert not marker.exists()


DEEPSPEED = ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp=2", "data.eval_files=[]"]


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    run_distributed(WORKER, 2, worker_args(out, *DEEPSPEED, "train.max_steps=1", "checkpoint.save_final=true", dp=2),
                    timeout_s=300)
    return out / "checkpoints" / "step-00000001"


@pytest.mark.parametrize("target", ["model_states", "optim_states"])
def test_deepspeed_load_paths_refuse_a_payload(tmp_path, deepspeed_run, target):
    marker, checkpoint = tmp_path / "PWNED", tmp_path / "step-00000001"
    shutil.copytree(deepspeed_run, checkpoint)
    planted = sorted((checkpoint / "deepspeed").glob(f"*_{target}.pt"))
    for path in planted:  # the real content, with a payload next to it
        state = torch.load(path, weights_only=False)
        torch.save({**state, "x": Payload(marker)}, path)
    resign(checkpoint)
    assert main(["convert", str(checkpoint), str(tmp_path / "hf")]) == 2
    assert not marker.exists()
    with pytest.raises(DistributedRunError, match=f"CheckpointError: cannot load .*{target}.pt: Unsupported global"):
        run_distributed(WORKER, 2, worker_args(tmp_path / "run", *DEEPSPEED, "train.max_steps=2",
                                               f"checkpoint.resume={checkpoint}", dp=2), timeout_s=300)
    assert not marker.exists()


def test_a_clean_deepspeed_checkpoint_still_converts(tmp_path, deepspeed_run):
    assert main(["convert", str(deepspeed_run), str(tmp_path / "hf")]) == 0
