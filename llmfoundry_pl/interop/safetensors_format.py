"""Our own folder format: the weights and everything needed to rebuild the model, loadable without Lightning.

    out/
      config.json        {"format": "llmfoundry_pl", "format_version": 1, "model": {ModelConfig fields}, ...}
      model.safetensors  the weights under our (Meta) names; a tied output head is stored once, as tok_embeddings
      tokenizer.model    the SentencePiece model

Unlike a Lightning checkpoint it holds no optimizer state and runs no pickle on load (safetensors is plain
tensors), so it is the form to share or to serve; unlike the Hugging Face export it keeps every ModelConfig field
and the training run's config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.interop.folder import (
    WEIGHTS,
    assign_weights,
    check_no_adapters,
    load_weights,
    read_json,
    read_tokenizer,
    save_weights,
    write_folder,
    write_json,
)
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

FORMAT, FORMAT_VERSION = "llmfoundry_pl", 1


def save_safetensors(
    model: Transformer, tokenizer: Tokenizer, out: str | os.PathLike, run_config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``tokenizer`` to the folder ``out`` (``run_config``: the training run's, for the record
    and for ``lfpl-eval`` to find the run's validation split)."""
    check_no_adapters(model)
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["output.weight"]  # the same tensor as tok_embeddings.weight; safetensors refuses to store it twice
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(model.config),
              "tokenizer_sha256": tokenizer.sha256, "run_config": run_config}

    def fill(folder: Path) -> None:
        write_json(folder / "config.json", config)
        save_weights(state, folder / WEIGHTS)
        (folder / "tokenizer.model").write_bytes(tokenizer.model_proto)

    return write_folder(out, fill, overwrite)


def is_own_format(config: dict) -> bool:
    return config.get("format") == FORMAT


def load_safetensors(path: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """The model (in eval mode, on the CPU) and tokenizer of a folder written by :func:`save_safetensors`."""
    folder = Path(path).expanduser()
    config = read_own_config(folder)
    try:
        cfg = ModelConfig(**config["model"])
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{folder}/config.json has a model section this version cannot read ({e})") from None
    tokenizer = read_tokenizer(folder)
    if config.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        raise ConfigError(f"{folder}/tokenizer.model is not the tokenizer this model was saved with; restore it")
    model = Transformer(cfg)
    assign_weights(model, load_weights(folder), folder / WEIGHTS)
    return model.eval(), tokenizer


def read_own_config(folder: Path) -> dict:
    """``config.json`` of one of our folders, checked for the format marker and version."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; it is not a folder written by lfpl-export")
    config = read_json(folder / "config.json")
    if not is_own_format(config):
        raise ConfigError(f"{folder}/config.json has no \"format\": \"{FORMAT}\"; it was not written by "
                          "save_safetensors / lfpl-export format=safetensors")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{folder} was written in format version {config['format_version']} by a newer "
                          f"llmfoundry_pl (this one reads up to {FORMAT_VERSION}); upgrade llmfoundry_pl")
    if not isinstance(config.get("model"), dict):
        raise ConfigError(f"{folder}/config.json has no \"model\" section; it is incomplete")
    run = config.get("run_config")  # read by lfpl-eval (the run's split) and lfpl-export: an edited one was a traceback
    groups = ("data", "model")  # the parts of it that are read
    if run is not None and not (isinstance(run, dict) and all(isinstance(run.get(g) or {}, dict) for g in groups)):
        raise ConfigError(f"{folder}/config.json has a \"run_config\" that is not a run's settings (edited?); restore "
                          "it, or set it to null")
    return config
