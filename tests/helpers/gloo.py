"""Real ``torch.distributed`` for tests without a GPU: each rank a process of its own, talking over gloo, and FSDP
wrapping as trainer=fsdp wraps, on the CPU."""

from __future__ import annotations

import functools
import gc
import multiprocessing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from llmfoundry_pl.model import TransformerBlock


def run_on_gloo_ranks(fn: Callable[[int], None], tmp_path: Path, world_size: int = 2) -> None:
    """Run ``fn(rank)`` in ``world_size`` processes joined in one gloo process group, as as many GPUs would run it.

    ``fn`` must be a module-level function (the processes are started afresh and import it). An exception in any
    rank fails the caller with that rank's traceback.

    The ranks are forked from multiprocessing's fork server, which imports torch, Lightning and the package once per
    test process (it runs no tensor operation, so the forks inherit no OpenMP state): spawning them as fresh
    interpreters spent ~6 s of each test importing."""
    multiprocessing.set_forkserver_preload(["lightning", "llmfoundry_pl.lit_module", __name__])  # before it starts
    torch.multiprocessing.start_processes(_join_and_run, args=(fn, world_size, str(tmp_path / "rendezvous")),
                                          nprocs=world_size, start_method="forkserver")


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


def shard_by_block(module: nn.Module, **fsdp_kwargs: Any) -> FullyShardedDataParallel:
    """``module`` under real FSDP on the CPU, one shard unit per transformer block as trainer=fsdp wraps it (Lightning's
    FSDPStrategy needs a GPU). Call it inside :func:`run_on_gloo_ranks`."""
    per_block = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={TransformerBlock})
    return FullyShardedDataParallel(module, auto_wrap_policy=per_block, device_id=torch.device("cpu"), **fsdp_kwargs)


class InRootForward(nn.Module):
    """``lit.<step>(*args)`` as the forward of a module FSDP can wrap: Lightning's FSDP strategy runs the training and
    validation steps inside the root module's forward, where the root's own shards (embedding, head) are gathered."""

    def __init__(self, lit: nn.Module, step: str) -> None:
        super().__init__()
        self.lit, self.step = lit, step

    def forward(self, *args: Any) -> Any:
        return getattr(self.lit, self.step)(*args)
