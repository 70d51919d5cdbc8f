"""Models in and out of llmfoundry_pl: Hugging Face Llama folders and our own safetensors folders.

    save_hf(model, tokenizer, "out/")              transformers' AutoModelForCausalLM / AutoTokenizer load "out/"
    model, tokenizer = load_hf("TinyLlama/")       a local Llama-architecture folder (with tokenizer.model)
    save_safetensors(model, tokenizer, "out/")     our own form: ModelConfig + weights + tokenizer.model
    model, tokenizer = load_safetensors("out/")
    model, tokenizer, source = load_folder(path)   either kind, told apart by its config.json

Nothing here imports Lightning or transformers (``lfpl-export`` is the command-line way in; see cli/export.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.interop.folder import read_json
from llmfoundry_pl.interop.hf import hf_config, hf_names, load_hf, model_config_from_hf, save_hf, to_hf_state_dict
from llmfoundry_pl.interop.safetensors_format import (
    is_own_format,
    load_safetensors,
    read_own_config,
    save_safetensors,
)
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

FORMAT_NAMES = {
    "ckpt": "Lightning checkpoint",
    "safetensors": "llmfoundry_pl safetensors folder",
    "hf": "Hugging Face Llama folder",
}


@dataclass
class ModelSource:
    """Where a loaded model came from: its path, its format (a key of FORMAT_NAMES), when known the config of the
    run that trained it, and whether LoRA adapters it held were merged into the weights as it loaded."""

    path: str
    format: str
    run_config: dict | None = None
    merged_lora: bool = False

    def __str__(self) -> str:
        return f"{self.path} ({FORMAT_NAMES[self.format]})"


def load_folder(path: str | os.PathLike) -> tuple[Transformer, Tokenizer, ModelSource]:
    """A model folder of either kind: ours (config.json carries our format marker) or Hugging Face's."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; give a folder written by lfpl-export or a Hugging Face "
                          "Llama folder")
    if is_own_format(read_json(folder / "config.json")):
        model, tokenizer = load_safetensors(folder)
        return model, tokenizer, ModelSource(str(path), "safetensors", read_own_config(folder).get("run_config"))
    model, tokenizer = load_hf(folder)
    return model, tokenizer, ModelSource(str(path), "hf")


__all__ = [
    "FORMAT_NAMES",
    "ModelSource",
    "hf_config",
    "hf_names",
    "load_folder",
    "load_hf",
    "load_safetensors",
    "model_config_from_hf",
    "save_hf",
    "save_safetensors",
    "to_hf_state_dict",
]
