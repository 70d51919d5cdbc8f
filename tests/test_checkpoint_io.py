import tempfile
from pathlib import Path

import pytest
import torch

from llmfoundry_pl.checkpoint_io import AtomicCheckpointIO
from llmfoundry_pl.cli.common import build_trainer


@pytest.fixture
def tmpdir_elsewhere(monkeypatch):
    """$TMPDIR on another filesystem than the run folder, as a tmpfs /tmp often is (/dev/shm here, where there is
    one): Lightning's writer built the file there, then copied it over the old checkpoint in place."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        folder = Path(tempfile.mkdtemp(dir=shm))
        monkeypatch.setattr(tempfile, "tempdir", str(folder))
        yield folder
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
    else:
        yield None


def test_a_checkpoint_is_renamed_into_place_not_rewritten(tmp_path, tmpdir_elsewhere):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(4096)}, path)
    with open(path, "rb") as reader:  # a command that opened the checkpoint while training saves the next one
        io.save_checkpoint({"step": 2, "w": torch.zeros(4096)}, path)
        assert torch.load(reader)["step"] == 1  # still the whole first file: the new one replaced its name only
    assert torch.load(path)["step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left beside it
    assert tmpdir_elsewhere is None or not any(tmpdir_elsewhere.iterdir())


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        io.save_checkpoint({"step": 2, "hook": lambda: None}, path)
    assert torch.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_training_saves_through_it(compose_train, tmp_path):
    trainer = build_trainer(compose_train(["hardware=cpu", f"paths.output_dir={tmp_path}"]).trainer, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
