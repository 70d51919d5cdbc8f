"""keep_freed_memory: freed large blocks are reused, not returned to the OS and page-faulted back in each step."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A training-like pattern of large tensors (64 and 32 MiB) made and freed every "step"; after a few warm-up steps,
# print the page faults of ten more.
_PROBE = """
import resource, sys, torch
from llmfoundry_pl.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    a = torch.ones(16 * 2**20); b = torch.ones(8 * 2**20); del a; c = torch.ones(16 * 2**20); del b, c
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_faulting_the_same_blocks_in_every_step():
    applied, kept = _faults("keep")
    _, default = _faults("default")
    pages_per_step = (64 + 32 + 64) * 2**20 // 4096
    assert applied == "True"
    assert default > 5 * pages_per_step  # glibc's default: each large block is a fresh mmap, faulted in page by page
    assert kept < default / 5


# A sweep's jobs run in one process: keep_freed_memory=false after a job with true kept the memory all the same.
# Frees a 300 MiB block after each setting in turn and prints how much of it went back to the OS.
_RETURNED = """
import ctypes, os, sys, torch
from llmfoundry_pl.allocator import keep_freed_memory

def returned_mib():
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    block = torch.ones(300 * 2**18)
    before = rss()
    del block
    return round((before - rss()) / 2**20)

for keep in sys.argv[1:]:
    applied = keep_freed_memory(keep == "true")
    print(keep, applied, returned_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_false_undoes_an_earlier_jobs_true():
    out = subprocess.run([sys.executable, "-c", _RETURNED, "false", "true", "false"], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    (first, _, first_mib), (keep, applied, kept_mib), (again, _, again_mib) = (line.split() for line in out[:3])
    assert applied == "True" and int(kept_mib) < 10  # kept for reuse
    assert int(first_mib) > 250 and int(again_mib) > 250  # returned, in a fresh process and after a true


def test_the_users_own_malloc_settings_rule(monkeypatch):
    from llmfoundry_pl import allocator

    monkeypatch.setattr(allocator, "_kept", False)  # as in a fresh process (an earlier test in this one kept)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_memory(True) is False and not allocator._kept
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0")
    assert allocator.keep_freed_memory(True) is False and not allocator._kept
