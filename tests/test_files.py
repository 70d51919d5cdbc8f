import errno
from pathlib import Path

import pytest

from llmfoundry_pl.files import atomic_write, atomic_write_bytes, build_lock, publish_folder, temporary_folder


def _disk_full(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_keeps_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    path = tmp_path / "summary.md"
    atomic_write_bytes(path, b"old")
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, _disk_full)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]  # the half-written temporary is gone


def test_atomic_write_creates_missing_folders(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b" / "meta.json", b"{}")
    assert (tmp_path / "a" / "b" / "meta.json").read_bytes() == b"{}"


def test_temporary_folder_is_gone_after_a_failed_build(tmp_path):
    with pytest.raises(KeyboardInterrupt), temporary_folder(tmp_path / "tokens") as tmp:
        (tmp / "train.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt
    assert not tmp.exists() and list(tmp_path.iterdir()) == []


def test_publish_folder_keeps_a_complete_folder_another_process_published_first(tmp_path):
    folder = tmp_path / "tokens"
    with temporary_folder(folder) as first:
        (first / "meta.json").write_text("first")
        publish_folder(first, folder, lambda f: (f / "meta.json").is_file())
    with temporary_folder(folder) as second:
        (second / "meta.json").write_text("second")
        publish_folder(second, folder, lambda f: (f / "meta.json").is_file())
    assert (folder / "meta.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["tokens"]


def test_publish_folder_replaces_an_incomplete_one(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    (folder / "train.bin").write_bytes(b"interrupted")  # no meta.json: a build that never finished
    with temporary_folder(folder) as tmp:
        (tmp / "meta.json").write_text("whole")
        publish_folder(tmp, folder, lambda f: (f / "meta.json").is_file())
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]


def test_a_build_where_no_lock_can_be_taken_goes_on_without_one(tmp_path):
    # a cache on a read-only disk, or (here) under a file: each process builds its copy, as before the lock
    (tmp_path / "a_file").write_text("")
    ran = []
    with build_lock(tmp_path / "a_file" / "tokens"):
        ran.append(True)
    assert ran == [True]
