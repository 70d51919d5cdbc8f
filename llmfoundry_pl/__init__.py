"""llmfoundry-pl: train Llama-style language models with PyTorch Lightning and Hydra.

The public API, in the order data flows: text → tokens → model → training → generation → sharing.

    from llmfoundry_pl import TextDataModule, DataConfig, Transformer, ModelConfig, LitLlama, generate_text
    lit = LitLlama.load_from_checkpoint("outputs/.../checkpoints/last.ckpt", map_location="cpu")
    print(generate_text(lit.model, lit.tokenizer, "ROMEO:", max_new_tokens=50))
    save_hf(lit.model, lit.tokenizer, "my-model/")       # transformers' AutoModelForCausalLM loads it
    model, tokenizer = load_hf("TinyLlama-1.1B/")         # a local Hugging Face Llama folder, as our Transformer
"""

import importlib

# Public name → the module that defines it, imported on first use (PEP 562): `import llmfoundry_pl` stays cheap,
# and a broken dependency (say sentencepiece) fails where its feature is used, not on every import of the package:
# lfpl-doctor, which lives inside the package, could not otherwise start to report it.
_EXPORTS = {
    "ConfigError": "config",
    "DataConfig": "config",
    "ModelConfig": "config",
    "OptimConfig": "config",
    "SchedulerConfig": "config",
    "TrainConfig": "config",
    "register_configs": "config",
    "TextDataModule": "data",
    "ChatDataModule": "data",
    "ChatFormat": "chat",
    "LitDPO": "lit_module",
    "prepare_corpus": "data",
    "generate": "inference",
    "generate_text": "inference",
    "load_folder": "interop",
    "load_hf": "interop",
    "load_safetensors": "interop",
    "save_hf": "interop",
    "save_safetensors": "interop",
    "LitLlama": "lit_module",
    "Transformer": "model",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
}

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
