"""What the entry points share: config conversion, checkpoint lookup, and errors printed as one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from llmfoundry_pl.config import ConfigError

CONFIG_PATH = "pkg://llmfoundry_pl.conf"  # conf/ ships inside the package (see pyproject.toml)
T = TypeVar("T")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`ConfigError` (a mistake in the user's settings or data) into one line on stderr and exit
    status 2, instead of a traceback. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dataclass(node: DictConfig, cls: type[T]) -> T:
    """A structured config node as its dataclass (runs ``__post_init__`` checks)."""
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, cls), f"expected {cls.__name__}, got {type(obj).__name__}"
    return obj


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str = "outputs") -> str | None:
    """``ckpt_path`` as given, or for ``last`` the newest ``checkpoints/last.ckpt`` under ``runs_dir``."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        candidates = sorted(Path(runs_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"ckpt_path=last found no checkpoints/last.ckpt under {runs_dir}/; give the path")
        return str(candidates[-1])
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; give the path of a .ckpt file (or ckpt_path=last)")
    return ckpt_path
