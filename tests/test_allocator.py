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
