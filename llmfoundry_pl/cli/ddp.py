"""Multi-process training (DDP, FSDP) launched from a Hydra app, single runs and ``-m`` sweeps alike.

Why this exists: Lightning starts ranks ≥ 1 by re-running the script with *all* of ``sys.argv``. Inside a Hydra
multirun that makes rank 1 run the whole sweep by itself (or deadlock when jobs differ), and the process group
and ``MASTER_*`` variables leak from one job into the next (measured; see shared/notes/hydra-ddp.md). So:

1. each extra rank is relaunched as a *single run of this job*: same entry point and config source, this job's
   own overrides, ``hydra.mode=RUN`` and this job's output directory;
2. at the end of every job the parent waits for its ranks, destroys the process group and restores the
   environment (:func:`end_distributed_job`), so the next job starts clean.

This reaches into Lightning internals (``_SubprocessScriptLauncher``), which is why ``pyproject.toml`` pins
``lightning<2.7`` and ``tests/test_cli.py`` keeps a 2-process CPU sweep in the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from llmfoundry_pl.config import ConfigError

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Tells a rank started for a sweep's job, a single run of its own, which sweep it belongs to: ckpt_path=last and
# init_from=last leave that sweep's runs out on every rank alike (cli.common.resolve_ckpt_path).
SWEEP_DIR_ENV = "LFPL_SWEEP_DIR"
_CONFIG_FLAGS = ("--config-path", "--config-name", "--config-dir", "-cp", "-cn", "-cd")
# Hydra overrides of the parent that a rank must not inherit: the child's run settings are set explicitly.
_PARENT_ONLY_HYDRA_KEYS = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.job.name", "hydra.output_subdir",
                           "hydra/sweeper", "hydra/launcher", "hydra.sweeper", "hydra.launcher")


def running_sweep_dir() -> str | None:
    """The folder of the sweep the current job belongs to, None outside a sweep: Hydra's while a ``-m`` job runs,
    and for the extra ranks of such a job (single runs of their own) what their launcher passed in
    :data:`SWEEP_DIR_ENV`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().sweep.dir
    return os.environ.get(SWEEP_DIR_ENV) or None


def rank_command(local_rank: int) -> list[str]:
    """The command line that starts rank ``local_rank`` of the current Hydra job as a single run."""
    from hydra.core.hydra_config import HydraConfig

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:  # a script or console entry point
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:  # python -m llmfoundry_pl.cli.train
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += _config_source_args(sys.argv[1:])
    command += list(hydra_cfg.overrides.task)
    command += [o for o in hydra_cfg.overrides.hydra if not o.lstrip("~+").startswith(_PARENT_ONLY_HYDRA_KEYS)]
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}",
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command


def _config_source_args(argv: list[str]) -> list[str]:
    """Keep --config-path/--config-name/--config-dir (both ``--flag value`` and ``--flag=value`` forms)."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            kept += [arg, argv[i + 1]]
            i += 1
        elif arg.split("=", 1)[0] in _CONFIG_FLAGS:
            kept.append(arg)
        i += 1
    return kept


def _quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may contain '=', ',' or spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class _HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with the child command of :func:`rank_command`."""

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        self.saved_env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        from hydra.utils import get_original_cwd

        sweep = {SWEEP_DIR_ENV: folder} if (folder := running_sweep_dir()) else {}
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank), **sweep}
            self.procs.append(subprocess.Popen(rank_command(local_rank), env=env, cwd=get_original_cwd()))


class _HydraRelaunch:
    """Mixin for Lightning's DDP/FSDP strategies: start extra ranks with :class:`_HydraJobLauncher`."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class HydraDDPStrategy(_HydraRelaunch, DDPStrategy):
    """``DDPStrategy`` whose extra ranks are single runs of the current Hydra job."""


class HydraFSDPStrategy(_HydraRelaunch, FSDPStrategy):
    """``FSDPStrategy`` whose extra ranks are single runs of the current Hydra job."""


def build_strategy(strategy: Any, devices: Any, block_class: type) -> Any:
    """The Trainer's ``strategy``: Lightning's name or object, or a Hydra-aware one when this is a Hydra app that
    will start several processes. FSDP wraps each transformer block (``block_class``) as one shard unit."""
    from hydra.core.hydra_config import HydraConfig

    if not isinstance(strategy, str):
        return strategy
    if strategy.endswith("_spawn") or strategy.endswith("_fork") or strategy.endswith("_notebook"):
        # The ranks run fit in child processes: this process never trains, so lfpl-train reported "trained 0
        # steps", no checkpoint and, from metric states the processes shared, a val/loss of half the true one.
        raise ConfigError(f"trainer.strategy={strategy} runs training in child processes lfpl-train cannot report "
                          "from; use trainer=ddp (trainer.strategy=ddp), which starts one process per device")
    hydra_app = HydraConfig.initialized()
    if strategy == "fsdp":
        cls = HydraFSDPStrategy if hydra_app else FSDPStrategy
        return cls(auto_wrap_policy={block_class}, state_dict_type="full")
    if strategy == "ddp" or (strategy == "auto" and (device_count(devices) or torch.cuda.device_count()) > 1):
        return HydraDDPStrategy() if hydra_app else DDPStrategy()
    return strategy


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` names: a count, a list of indices (a YAML list or "0,2"); None for
    -1 and "auto", all the machine has (a plan may be for another machine)."""
    if devices in (-1, "-1", "auto"):
        return None
    if isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, Sequence) and not isinstance(devices, str):  # a list, or OmegaConf's ListConfig
        count = len(devices)
    else:
        try:
            count = int(devices)
        except (TypeError, ValueError):
            count = 0
    if count < 1:  # Lightning refuses these too, when it builds the Trainer
        raise ConfigError(f"trainer.devices={devices} names no device: give a count (1, 2, ...), a list of indices "
                          "([0,1] or \"0,1\"), or auto")
    return count

def end_distributed_job(strategy: Any, failed: bool) -> None:
    """After a job: reap the extra ranks (killed if the job failed), destroy the process group and restore the
    launch environment, so that the next job of a sweep starts from a clean process."""
    if not isinstance(strategy, Strategy):
        return
    launcher = getattr(strategy, "launcher", None)
    if isinstance(launcher, _HydraJobLauncher):
        for proc in launcher.procs:
            if failed:
                proc.kill()
            proc.wait()
        for key, value in getattr(launcher, "saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    from lightning.fabric.utilities.distributed import _destroy_dist_connection

    _destroy_dist_connection()
