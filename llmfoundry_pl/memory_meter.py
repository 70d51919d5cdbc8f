"""Peak memory of one stretch of work (a benchmark contender, a round, a sweep job) on any device.

``start(device)`` releases what is cached but unused and restarts the peak counter, and returns the bytes in use
then; ``peak(device)`` returns the most bytes in use since. What is counted differs by device:

- **CUDA**: the caching allocator's own counters (``torch.cuda.max_memory_allocated``), tensors only.
- **CPU on Linux**: the process's resident memory (``VmRSS``) and its high-water mark (``VmHWM``), which the kernel
  restarts on request (``/proc/self/clear_refs``). The peak of a process otherwise only grows, so a second
  contender would be charged with the first one's peak. Restarting it is not enough by itself: under
  ``keep_freed_memory`` (the default, ``llmfoundry_pl/allocator.py``) the heap keeps what the first contender
  freed, still resident, so ``start`` hands it back to the OS first.
- **Apple MPS**: the memory the Metal driver holds for the process (``torch.mps.driver_allocated_memory``). There is
  no peak counter; the caching allocator keeps its blocks until emptied, so what it holds at the end is close to
  the peak (``start`` empties it).
- **Other CPUs** (macOS): the process's peak resident memory since it started (``ru_maxrss``); it cannot be
  restarted, so only the first stretch in a process is its own.
"""

from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path

import torch

from llmfoundry_pl.allocator import release_freed_memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"  # clear_refs: set the peak resident set size to the current one (Linux >= 4.0)


def start(device: torch.device) -> int:
    """Release cached memory, restart the peak counter, and return the bytes in use now."""
    gc.collect()  # tensors kept alive only by reference cycles would otherwise count as in use
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        torch.mps.empty_cache()
        return torch.mps.driver_allocated_memory()
    if _STATUS.is_file():
        release_freed_memory()
        try:
            _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        except OSError:  # an older kernel or a sandbox that forbids it: the peak then counts from the process start
            pass
        return _status_bytes("VmRSS")
    return _max_rss()


def peak(device: torch.device) -> int:
    """The most bytes in use since the last ``start`` (see the module docstring for what each device counts)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    if _STATUS.is_file():
        return _status_bytes("VmHWM")
    return _max_rss()


def counted(device: torch.device) -> str:
    """What ``peak`` counts on ``device``, in a few words for a report."""
    if device.type == "cuda":
        return "CUDA memory allocated"
    if device.type == "mps":
        return "Metal driver memory"
    return "resident memory"


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS:   123456 kB``), in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{_STATUS} has no {field} line")


def _max_rss() -> int:
    """The process's peak resident memory since it started: bytes on macOS, KiB on other Unixes."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024
