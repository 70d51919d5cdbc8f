"""memory_meter: each measured stretch's peak is its own, on every kind of device the benchmark runs on."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from llmfoundry_pl import memory_meter

CPU = torch.device("cpu")
MiB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident peak restarts through /proc: Linux")
def test_on_linux_start_restarts_the_resident_peak():
    earlier = torch.ones(64 * MiB)  # 256 MiB, touched: the process's resident peak is at least this high now
    del earlier
    floor = memory_meter.start(CPU)
    assert memory_meter.peak(CPU) - floor < 32 * MiB  # the 256 MiB freed before start are not counted
    now = torch.ones(32 * MiB)  # 128 MiB
    assert memory_meter.peak(CPU) - floor >= 120 * MiB
    del now


@pytest.mark.parametrize(("platform", "unit"), [("darwin", 1), ("freebsd14", 1024)])
def test_a_cpu_without_proc_reports_the_process_peak_in_bytes(monkeypatch, tmp_path, platform, unit):
    monkeypatch.setattr(memory_meter, "_STATUS", tmp_path / "no-proc")
    monkeypatch.setattr(memory_meter.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=5000))
    monkeypatch.setattr(memory_meter.sys, "platform", platform)  # macOS counts ru_maxrss in bytes, the rest in KiB
    assert memory_meter.start(CPU) == memory_meter.peak(CPU) == 5000 * unit


def test_on_mps_the_metal_driver_memory_counts_from_an_emptied_cache(monkeypatch):
    held = {"bytes": 300 * MiB}
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: held.update(bytes=40 * MiB))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: held["bytes"])
    mps = torch.device("mps")
    assert memory_meter.start(mps) == 40 * MiB  # what the caching allocator kept from before is let go first
    held["bytes"] = 500 * MiB
    assert memory_meter.peak(mps) == 500 * MiB
