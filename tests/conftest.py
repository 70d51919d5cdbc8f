"""Shared fixtures: a per-session token cache, config composition, and the CLI as a real subprocess (forked with its
imports done: tests/helpers/forked_cli.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from llmfoundry_pl.config import register_configs
from tests.helpers import forked_cli

# A model and run small enough for a 2-core CPU to train in seconds, through the real code paths.
TINY = [
    "hardware=cpu", "compile=false",  # seconds-long runs: compiling would take longer than training
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "data.vocab_size=512", "data.seq_len=32", "data.batch_size=4",
    "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
    "scheduler.warmup_steps=2", "callbacks.progress_bar=null", "callbacks.sample_text.max_new_tokens=8",
    "sample_tokens=8", "callbacks.throughput.window_size=4",
]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine a second OpenMP thread that waits for a core
    makes every small op stall (training test_interop's checkpoint measured 0.5 s vs 37 s). Modules that want it
    say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the same for the commands run as subprocesses
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/token cache for the whole session: the bundled corpus is tokenized once."""
    path = tmp_path_factory.mktemp("lfpl-cache")
    os.environ["LFPL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def compose_train(cache_dir: Path):
    """Compose conf/train.yaml with overrides, as lfpl-train would (without running it)."""
    register_configs()

    def _compose(overrides: list[str] = (), name: str = "train", return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="llmfoundry_pl.conf", version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides), return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    command: str, *args: str, cwd: Path, timeout: int = 300, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m llmfoundry_pl.<command> args...`` in ``cwd``, as a user would from a shell (``input``:
    what is typed on stdin), in a process forked from one that has done the imports (tests/helpers/forked_cli.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = forked_cli.run(command, list(args), cwd=cwd, env=env, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{command} {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc
