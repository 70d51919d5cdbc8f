"""What both folder formats share: writing a folder all at once, and reading or writing its safetensors weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.files import temp_sibling
from llmfoundry_pl.lora import has_lora
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def write_folder(out: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create the folder ``out`` with ``fill(tmp)``: the files are written into a temporary sibling folder that is
    renamed to ``out`` only when complete, so an interrupted export never leaves a half-written model behind.
    An existing non-empty ``out`` is refused unless ``overwrite``."""
    out = check_writable(out, overwrite)
    tmp, old = temp_sibling(out), temp_sibling(out, "old")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        if overwrite and out.exists():  # move the old folder aside first (a rename cannot replace a non-empty one)
            out.rename(old)
        try:
            tmp.rename(out)  # without overwrite, fails if another writer filled out meanwhile: its folder stays
        except OSError as e:
            if old.exists():
                old.rename(out)  # put the old folder back
            if not overwrite and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ConfigError(f"out={out} was written by something else while this export ran; choose another "
                                  "folder, or pass overwrite=true to replace it") from None
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # no permission, disk full, ...: the user's to fix
        raise ConfigError(f"cannot write out={out}: {e.strerror or e} ({e.filename}); check the path and its space "
                          "and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out`` as a Path, if a folder may be written there (callers check before loading a big model)."""
    out = Path(out).expanduser()
    if Path.cwd().resolve().is_relative_to(out.resolve()):  # out=. was a traceback: a path with no name
        raise ConfigError(f"out={out} is the folder you are in (or holds it), which the export would replace; give "
                          "the path of a new folder, such as out=my-model")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a folder; give the path of a folder to create")
    inside_a_file = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if inside_a_file is not None:  # was "cannot write out=...: File exists (model.ckpt)"
        raise ConfigError(f"out={out} is inside {inside_a_file}, which is a file, not a folder; give the path of a "
                          "folder to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} exists and is not empty; choose another folder, or pass overwrite=true to "
                          "replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        # overwrite=true with out=outputs deleted every run and checkpoint in it
        raise ConfigError(f"out={out} is not a model folder (it has no config.json), and overwrite=true replaces only "
                          "those; give the path of a new folder, such as out=my-model")
    return out


def check_no_adapters(model: Transformer) -> None:
    """Refuse to save a model that still holds LoRA adapters (as ``lit.model`` does after a LoRA run): its weights
    carry peft's names, which ``save_hf`` met as a KeyError and ``save_safetensors`` wrote into a folder that no
    load could read."""
    if has_lora(model):
        raise ConfigError("the model holds LoRA adapters; merge them into its weights first (model = "
                          "llmfoundry_pl.lora.merge_lora(model)), or export its checkpoint with lfpl-export "
                          "merge_lora=true")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({type(e).__name__}: {e}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; fix or replace the file")
    return data


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file. ``format=pt`` in the header is what transformers checks before loading it."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); give it the permissions of the folder's other files, so a
    # model shared with (or served by) another user is readable.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the shards listed in ``model.safetensors.index.json``."""
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / SHARD_INDEX).is_file():
        weight_map = read_json(folder / SHARD_INDEX).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")))
        hint = f" (found {found}: convert it to safetensors first)" if found else ""
        raise ConfigError(f"{folder} has no {WEIGHTS} nor {SHARD_INDEX}{hint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    state[name] = f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"{file} is not a readable safetensors file ({e})") from None
    return state


def assign_weights(
    model: Transformer, state: dict[str, torch.Tensor], where: Path, file_names: dict[str, str] | None = None
) -> None:
    """Copy ``state`` (our names) into ``model``; a missing, unexpected or misshapen tensor is one line, naming
    tensors as the file does (``file_names``: our name → the file's)."""
    if model.config.tie_embeddings and "tok_embeddings.weight" in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}  # stored once, see save_weights' callers
    shown = (lambda name: (file_names or {}).get(name, name))
    expected = model.state_dict()
    problems = {
        "lacks tensors": [shown(k) for k in expected if k not in state],
        "has unexpected tensors": [shown(k) for k in state if k not in expected],
        "has tensors of the wrong shape": [f"{shown(k)} {list(state[k].shape)} instead of {list(v.shape)}"
                                           for k, v in expected.items() if k in state and state[k].shape != v.shape],
    }
    for problem, names in problems.items():
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ConfigError(f"{where} {problem} for its config.json: {', '.join(names[:3])}{more}")
    model.load_state_dict(state)


def read_tokenizer(folder: Path) -> Tokenizer:
    """The SentencePiece ``tokenizer.model`` of a model folder."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        hint = " (a tokenizer.json alone is not supported: the tokenizer must be SentencePiece)"
        raise ConfigError(f"{folder} has no tokenizer.model{hint if (folder / 'tokenizer.json').is_file() else ''}")
    return Tokenizer.from_file(path, key=None)  # (which refuses one without <s> or </s>)
