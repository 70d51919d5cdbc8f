"""Keep freed host memory in the process: a CPU training step re-allocates the same large tensors every step.

glibc's malloc serves each large allocation (past a threshold that adapts up to 32 MiB: here the (B, T, vocab)
logits and their gradients) with a fresh ``mmap`` and gives it back with ``munmap`` when freed. The
next step then page-faults the same amount in again and the kernel zeroes every page: on a 2-core CPU that measured
~6% of a training step of the ref16m preset (and a 64 MiB-output matmul ran at 218 instead of 329 GFLOP/s).
Turning ``mmap`` off for allocations and raising the trim threshold makes freed blocks stay on the heap for reuse
(after a few steps: PyTorch's 64-byte-aligned requests need slightly more than a freed block of the same size, so
the heap first grows until freed neighbours merge; then a step faults ~25× fewer pages, ``tests/test_allocator.py``) —
what jemalloc or tcmalloc (the usual advice, via ``LD_PRELOAD``) do, without an extra system package. The price is
a resident-memory floor at the run's peak, which a training process reaches every step anyway.

Only glibc (Linux) has ``mallopt``; elsewhere this does nothing. ``release_freed_memory`` gives the kept memory back
once, when a measurement must start from what is really in use (``llmfoundry_pl/memory_meter.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # free memory at the heap's top is returned to the OS past this much (C int: at most 2 GiB)
_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's own (its threshold adapts no more once set)
# The user's own malloc settings, which win over this module's (glibc reads them at start)
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_kept = False  # whether this process keeps freed memory now


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def keep_freed_memory(keep: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS (``keep_freed_memory=true``,
    the default of lfpl-train and lfpl-bench); True if it applied. Process-wide: call it at the start of each job.

    ``keep=False`` undoes what an earlier job of the same process set (Hydra runs a sweep's jobs in one process:
    ``-m keep_freed_memory=true,false`` compared the same setting twice), returning what is kept; in a process that
    never kept any, it leaves glibc as it starts. The user's own ``MALLOC_*_`` variables (or the glibc tunables of the
    same settings) are left to rule, with a line to say so."""
    global _kept
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is None:  # not Linux, or not glibc (e.g. musl without mallopt)
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")  # glibc.malloc.trim_threshold=... is MALLOC_TRIM_THRESHOLD_
    users_own = any(name in os.environ or f"glibc.malloc.{name[7:-1].lower()}=" in tunables for name in _USER_SETTINGS)
    if keep and users_own:
        log.info("keep_freed_memory=true left to the MALLOC_*_ / GLIBC_TUNABLES settings in the environment")
        return False
    if keep:
        # mallopt returns 1 on success; a libc that rejects a parameter leaves that setting as it was.
        _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
        return _kept
    if _kept:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _kept = False
        release_freed_memory()
    return False


def release_freed_memory() -> bool:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim``, which also releases free pages in the
    middle of the heap, not only at its top); True if it ran. The kept blocks are faulted in again when next needed,
    so call it between measurements, not between training steps."""
    malloc_trim = getattr(_glibc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
