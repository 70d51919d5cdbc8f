"""llmfoundry-pl: train Llama-style language models with PyTorch Lightning and Hydra.

The public API, in the order data flows: text → tokens → model → training → generation → sharing.

    from llmfoundry_pl import TextDataModule, DataConfig, Transformer, ModelConfig, LitLlama, generate_text
    lit = LitLlama.load_from_checkpoint("outputs/.../checkpoints/last.ckpt", map_location="cpu")
    print(generate_text(lit.model, lit.tokenizer, "ROMEO:", max_new_tokens=50))
    save_hf(lit.model, lit.tokenizer, "my-model/")       # transformers' AutoModelForCausalLM loads it
    model, tokenizer = load_hf("TinyLlama-1.1B/")         # a local Hugging Face Llama folder, as our Transformer
"""

from llmfoundry_pl.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
    register_configs,
)
from llmfoundry_pl.data import TextDataModule, prepare_corpus
from llmfoundry_pl.inference import generate, generate_text
from llmfoundry_pl.interop import load_folder, load_hf, load_safetensors, save_hf, save_safetensors
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataConfig",
    "LitLlama",
    "ModelConfig",
    "OptimConfig",
    "SchedulerConfig",
    "TextDataModule",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "generate",
    "generate_text",
    "load_folder",
    "load_hf",
    "load_safetensors",
    "prepare_corpus",
    "register_configs",
    "save_hf",
    "save_safetensors",
    "train_tokenizer",
]
