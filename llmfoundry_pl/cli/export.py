"""``lfpl-export``: write a model as a folder that other tools load.

    lfpl-export ckpt_path=outputs/.../last.ckpt out=my-model                 # Hugging Face (format=hf, the default)
    lfpl-export ckpt_path=... format=safetensors out=my-model-st             # ours: loads without Lightning
    lfpl-export ckpt_path=TinyLlama/ format=safetensors out=tinyllama-st     # the input may be any model folder too
    lfpl-export ckpt_path=lora_run/.../last.ckpt merge_lora=true out=merged  # LoRA: base + adapters, merged

    from transformers import AutoModelForCausalLM, AutoTokenizer           # format=hf, then:
    model, tokenizer = AutoModelForCausalLM.from_pretrained("my-model"), AutoTokenizer.from_pretrained("my-model")
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from llmfoundry_pl.cli.common import (
    load_model,
    read_checkpoint,
    resolve_ckpt_path,
    to_dataclass,
)
from llmfoundry_pl.config import ConfigError, ExportConfig
from llmfoundry_pl.interop import FORMAT_NAMES, save_hf, save_safetensors
from llmfoundry_pl.interop.folder import check_writable
from llmfoundry_pl.interop.hf import verify_hf


def export(node: DictConfig) -> Path:
    cfg = to_dataclass(node, ExportConfig)
    out = check_writable(cfg.out, cfg.overwrite)  # before loading: a refusal should not wait for a big model
    for needed in _sources(cfg.ckpt_path):  # replacing out would delete what is being exported
        if needed.resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"out={cfg.out} holds the model being exported ({needed}); give the path of a new "
                              "folder, such as out=my-model")
    model, tokenizer, source = load_model(cfg.ckpt_path)  # a LoRA checkpoint comes back merged
    if source.merged_lora != cfg.merge_lora:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} holds LoRA adapters; merge_lora=true writes them merged into "
                          "the base weights" if source.merged_lora else
                          f"merge_lora=true, but ckpt_path={cfg.ckpt_path} has no LoRA adapters; drop merge_lora")
    if cfg.format == "hf":
        out = save_hf(model, tokenizer, cfg.out, overwrite=cfg.overwrite)
    else:
        out = save_safetensors(model, tokenizer, cfg.out, run_config=source.run_config, overwrite=cfg.overwrite)
    print(f"exported {source}\n      as {out} ({FORMAT_NAMES[cfg.format]}, {model.num_params():,} parameters)")
    if cfg.verify:
        diff = verify_hf(out, model, tokenizer)
        print(f"verified with transformers: same token ids, logits within {diff:.1e}")
    return out


def _sources(ckpt_path: str) -> list[Path]:
    """What an export of ``ckpt_path`` reads: the checkpoint or folder, and for LoRA adapters the base model their
    checkpoint records (replaced by the export, it left the adapters on other weights)."""
    source = Path(resolve_ckpt_path(ckpt_path) if ckpt_path == "last" else ckpt_path).expanduser()
    if not source.is_file():
        return [source]
    hparams = read_checkpoint(str(source)).get("hyper_parameters", {})
    base = hparams.get("init_from") if (hparams.get("lora") or {}).get("enabled") else None
    return [source] + ([Path(base)] if base else [])
