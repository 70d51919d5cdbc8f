"""What the entry points share: config conversion, model and checkpoint lookup, and errors printed as one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from llmfoundry_pl.config import ConfigError, DataConfig, ModelConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.interop import ModelSource, load_folder
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

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
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required; give it on the command line ({e.full_key}=...)", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_data_and_model(cfg: DictConfig) -> tuple[TextDataModule, ModelConfig]:
    """The prepared data module and the model config of a training config (lfpl-train, lfpl-bench).

    Data first: the model's vocabulary is the tokenizer's. (Lightning calls prepare_data again in fit; by then it
    only reads the cache.)"""
    datamodule = TextDataModule(to_dataclass(cfg.data, DataConfig))
    datamodule.prepare_data()
    model_cfg = to_dataclass(cfg.model, ModelConfig)
    if model_cfg.vocab_size != datamodule.tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} but the tokenizer has {datamodule.tokenizer.vocab_size} tokens; "
            "leave model.vocab_size at ${data.vocab_size}"
        )
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    return datamodule, model_cfg


def to_dataclass(node: DictConfig, cls: type[T]) -> T:
    """A structured config node as its dataclass (runs ``__post_init__`` checks)."""
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, cls), f"expected {cls.__name__}, got {type(obj).__name__}"
    return obj


def load_model(ckpt_path: str | None, key: str = "ckpt_path") -> tuple[Transformer, Tokenizer, ModelSource]:
    """The model (on the CPU), its tokenizer and where they came from, for any of the forms a user may hold: a
    checkpoint written by ``lfpl-train`` (or ``last``), a folder written by ``lfpl-export`` (either format), or a
    Hugging Face Llama folder. Folders are told apart by their config.json. ``key`` names the setting in errors."""
    if ckpt_path not in (None, "last"):
        path = Path(ckpt_path).expanduser()
        if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
            path = path.parent  # a file inside a model folder: the folder is meant
        if path.is_dir():
            return load_folder(path)
        if not path.exists():
            raise ConfigError(f"{key}={ckpt_path} does not exist; give a .ckpt file (or last), a folder written "
                              "by lfpl-export, or a Hugging Face Llama folder")
    path, lit = load_checkpoint(ckpt_path, key)
    return lit.model, lit.tokenizer, ModelSource(path, "ckpt", lit.hparams.run_config)


def load_checkpoint(ckpt_path: str | None, key: str = "ckpt_path") -> tuple[str, LitLlama]:
    """The resolved path and the model of a checkpoint written by ``lfpl-train`` (on the CPU; callers move it)."""
    path = resolve_ckpt_path(ckpt_path, key=key)
    try:
        lit = LitLlama.load_from_checkpoint(path, map_location="cpu")
    except Exception as e:  # a truncated file, another program's checkpoint, ...: say so in one line
        reason = " ".join(str(e).split()).split(". ")[0][:160]  # the first sentence is the useful one
        raise ConfigError(
            f"{key}={path} is not a checkpoint written by lfpl-train ({type(e).__name__}: {reason})"
        ) from None
    if lit.tokenizer is None:
        raise ConfigError(f"{key}={path} has no tokenizer inside; it was not written by lfpl-train")
    return path, lit


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str = "outputs", key: str = "ckpt_path") -> str | None:
    """``ckpt_path`` as given, or for ``last`` the newest ``checkpoints/last.ckpt`` under ``runs_dir``."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        candidates = sorted(Path(runs_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"{key}=last found no checkpoints/last.ckpt under {runs_dir}/; give the path")
        return str(candidates[-1])
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"{key}={ckpt_path} does not exist; give the path of a .ckpt file (or {key}=last)")
    return ckpt_path
