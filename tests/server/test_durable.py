"""The coordinator's files are replaced whole and reach the disk: file and folder fsynced, no half file."""

import os

import pytest
import torch

from server import checkpoint, durable, runlog


@pytest.fixture
def synced(monkeypatch):
    """What os.fsync was called on, as paths (a folder's fd names the folder)."""
    seen = []
    real = os.fsync

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_a_checkpoint_and_the_run_log_reach_the_disk_file_and_folder(tmp_path, synced):
    checkpoint.save(tmp_path / checkpoint.LAST, {"w": torch.ones(2)}, {}, 3, {})
    assert str(tmp_path) in synced and any(p.startswith(str(tmp_path / ".checkpoint-last.pt.")) for p in synced)
    synced.clear()
    runlog.rewrite(tmp_path / runlog.RUN_LOG, [{"round": 1}, {"round": 2, "x": float("inf")}])
    assert str(tmp_path) in synced
    assert runlog.read(tmp_path / runlog.RUN_LOG) == [{"round": 1}, {"round": 2, "x": None}]


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.save(path, {"w": torch.ones(2)}, {}, 1, {})

    def crash(f):
        f.write(b"half a model")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        durable.replace(path, crash)
    assert checkpoint.load(path)["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
