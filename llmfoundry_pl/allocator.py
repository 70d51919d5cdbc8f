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
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # free memory at the heap's top is returned to the OS past this much (C int: at most 2 GiB)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; True if it applied.

    Process-wide and not undone: call it at the start of a training process (``keep_freed_memory=true``, the
    default of lfpl-train and lfpl-bench)."""
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is None:  # not Linux, or not glibc (e.g. musl without mallopt)
        return False
    # mallopt returns 1 on success; a libc that rejects a parameter leaves that setting as it was.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))


def release_freed_memory() -> bool:
    """Return the heap's free memory to the OS now (glibc's ``malloc_trim``, which also releases free pages in the
    middle of the heap, not only at its top); True if it ran. The kept blocks are faulted in again when next needed,
    so call it between measurements, not between training steps."""
    malloc_trim = getattr(_glibc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
