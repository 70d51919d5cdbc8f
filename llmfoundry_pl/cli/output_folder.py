"""A Hydra callback that creates the run's folder (``hydra.run.dir``, or a sweep's ``hydra.sweep.dir``) first.

Hydra creates it itself, before the command's code runs, and a path it cannot create was its traceback: 33 lines
for ``paths.runs_dir=/proc/nope``, a ``NotADirectoryError`` for a file in the way. Created here, before Hydra
does, the same failure is one line. (Hydra caches ``${now:...}``, so the folder made here is the one Hydra uses.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CreateOutputFolder(Callback):
    """Creates ``hydra.run.dir`` (one run) or ``hydra.sweep.dir`` (a multirun), or exits with one line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        create_output_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        create_output_folder(config.hydra.sweep.dir, "hydra.sweep.dir")


def create_output_folder(folder: str, setting: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the run's folder {folder} ({setting}): {e.strerror or e}; point paths.runs_dir "
              f"or {setting} at a folder you can write", file=sys.stderr)
        raise SystemExit(2) from None
