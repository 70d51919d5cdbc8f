"""Files and folders that are whole or absent, never half-written.

Everything the project writes to last (checkpoints, tokenizers, token files, exports, sweep summaries) is built
under a hidden temporary name beside its final one and renamed into place. On one filesystem a rename is atomic: a
reader, or a later run, sees the old version or the new one, and a crash, a full disk or Ctrl-C mid-write leaves no
file that looks finished. Whatever temporary is left after a failure is removed, so failures do not pile up unseen.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def temp_sibling(path: Path, suffix: str = "tmp") -> Path:
    """A hidden temporary name next to ``path`` (ending in ``.suffix``), to build it under and rename into place.
    Random rather than the process id: processes on two machines sharing a folder may well have the same id."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{suffix}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create the file ``path`` with ``write(tmp)``, so that it is either absent (or its old self) or complete.
    Processes writing the same contents at once (ranks saving the tokenizer they each trained) may all do so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failed write; after the rename there is nothing left to remove


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def temporary_folder(folder: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``folder`` to build it in, then :func:`publish_folder` it, which renames it away.
    Whatever is still there at the end goes: a build that failed, was interrupted (Ctrl-C) or found nothing to
    publish leaves nothing half-written to grow unseen (an interrupted chunk build's folder could hold gigabytes)."""
    tmp = temp_sibling(folder)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, folder: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename the finished temporary folder ``tmp`` into place as ``folder``.

    Processes that start together on a cold cache (torchrun or SLURM ranks, a sweep sharing data.cache_dir) build
    the same folder: the first rename wins, and the others keep that folder, which its owner may already be reading,
    and delete their own copy. Only a folder that ``is_complete`` rejects (interrupted, or outdated) is replaced."""
    for last_try in (False, True):
        try:
            os.replace(tmp, folder)  # refused while ``folder`` holds files
            return
        except OSError:
            if is_complete(folder):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if last_try:
                raise
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold the lock on building ``path`` (a cache file or folder): one process builds it while the others wait,
    then find it built. Every rank of a torchrun or SLURM job prepares the data before the Trainer (and its
    process group) exists, since the model's vocabulary comes from it: on a cold cache, 8 GPUs a node could train 8
    tokenizers and tokenize the corpus 8 times at once, on shared storage. Callers check again for ``path`` once
    they hold the lock (:func:`cached_or_built` does both).

    The operating system's ``flock`` on a hidden, empty ``.<name>.lock`` beside ``path``: released when its holder
    dies, and across machines on NFS. Where none can be taken (a read-only cache, Lustre mounted without flock,
    Windows), each process builds its own copy as before, and :func:`publish_folder` keeps the first. By hand rather
    than with the filelock package, whose releases differ exactly there: its 3.x ones wait forever where the
    filesystem refuses locks (ENOLCK) or raise (ENOSYS), and users' environments hold either."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only cache: no lock to take
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: another process is building it
            log.info(f"waiting for another process to finish building {path}")
            with suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK, ENOSYS, EINVAL: this filesystem takes no lock
            pass
        yield
    finally:
        os.close(fd)  # which releases the lock


def cached_or_built(path: Path, read: Callable[[], T | None], build: Callable[[], T]) -> T:
    """What ``read`` finds of the cache entry ``path``; else, under :func:`build_lock`, what it finds once the lock
    is held (another process may have built it meanwhile), or what ``build`` makes."""
    found = read()
    if found is None:
        with build_lock(path):
            found = read()
            if found is None:
                found = build()
    return found
