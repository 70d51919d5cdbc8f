"""Real ``torch.distributed`` for tests without a GPU: each rank a process of its own, talking over gloo."""

from __future__ import annotations

import gc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def run_on_gloo_ranks(fn: Callable[[int], None], tmp_path: Path, world_size: int = 2) -> None:
    """Run ``fn(rank)`` in ``world_size`` processes joined in one gloo process group, as as many GPUs would run it.

    ``fn`` must be a module-level function (the processes are spawned). An exception in any rank fails the caller
    with that rank's traceback."""
    torch.multiprocessing.spawn(_join_and_run, args=(fn, world_size, str(tmp_path / "rendezvous")), nprocs=world_size)


def _join_and_run(rank: int, fn: Callable[[int], None], world_size: int, rendezvous: str) -> None:
    # A rank left waiting in a collective the others never join fails after two minutes, not gloo's default 30
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=2))
    try:
        fn(rank)
        # Leave in step: a rank that tore its group down and exited while the other still used it, with FSDP modules
        # holding the group until the interpreter's teardown, aborted once in CI ("terminate called without an active
        # exception"). The barrier waits for every rank, and collecting frees what fn made while the group is alive.
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()
