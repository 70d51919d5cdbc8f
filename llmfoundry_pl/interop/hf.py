"""Hugging Face ``LlamaForCausalLM`` folders ↔ our :class:`Transformer` and :class:`Tokenizer`.

    save_hf(model, tokenizer, "out/")         # transformers' AutoModelForCausalLM / AutoTokenizer load "out/"
    model, tokenizer = load_hf("TinyLlama/")  # a local Llama-architecture folder with tokenizer.model

A folder holds ``config.json``, ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``) and
``tokenizer.model``; the folders we write add ``tokenizer.json`` and ``tokenizer_config.json`` (hf_tokenizer.py),
and ``generation_config.json`` when the tokenizer has the chat tokens (so that ``generate`` stops at ``<|end|>``).
Neither direction imports transformers: the files are JSON, safetensors and the SentencePiece model itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmfoundry_pl.chat import END
from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.interop.folder import (
    assign_weights,
    check_no_adapters,
    load_weights,
    read_json,
    read_tokenizer,
    save_weights,
    write_folder,
    write_json,
)
from llmfoundry_pl.interop.hf_tokenizer import (
    check_convertible,
    has_chat_tokens,
    read_spec,
    tokenizer_config,
    tokenizer_json,
)
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

# The one table of names, used in both directions: Meta/torchtitan names (model.py) on the left, Hugging Face's
# on the right. wq and wk need no permutation: model.py pairs RoPE channels as HF does (rotate_half).
GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter name → Hugging Face's, for every parameter of an ``n_layers`` model."""
    names = dict(GLOBAL_NAMES)
    for i in range(n_layers):
        for ours, theirs in LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face's names; a tied output head is left out (HF ties it back on load, and
    safetensors refuses to store one tensor twice)."""
    names = hf_names(model.config.n_layers)
    state = model.state_dict()
    return {names[k]: v for k, v in state.items() if not (model.config.tie_embeddings and k == "output.weight")}


# ---------------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` of the equivalent ``LlamaForCausalLM``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # read by transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # read by transformers 5
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,  # our dropout also covers the residual branches, which HF's Llama has no knob for
        "initializer_range": cfg.init_std,
        "bos_token_id": _id_or_none(tokenizer.bos_id),
        "eos_token_id": _id_or_none(tokenizer.eos_id),
        "pad_token_id": _id_or_none(tokenizer.pad_id),
        "torch_dtype": dtype_name,  # transformers 4
        "dtype": dtype_name,  # transformers 5
        "use_cache": True,
    }


def hf_generation_config(tokenizer: Tokenizer) -> dict | None:
    """``generation_config.json`` for a tokenizer with the chat tokens, else None (config.json's ids suffice).

    A chat-tuned model ends its reply with ``<|end|>``, never ``</s>``: with config.json's ``</s>`` alone,
    transformers' ``generate`` would run on into turns the model invents. Both ids stop it, as Phi-3's
    ``<|end|>`` does. Written by hand, like config.json, so that exporting needs no transformers."""
    if not has_chat_tokens(tokenizer):
        return None
    return {
        "bos_token_id": _id_or_none(tokenizer.bos_id),
        "eos_token_id": [tokenizer.eos_id, tokenizer.sp.piece_to_id(END)],
        "pad_token_id": _id_or_none(tokenizer.pad_id),
    }


def _id_or_none(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def model_config_from_hf(hf: dict, where: Path) -> ModelConfig:
    """Our ModelConfig for a Hugging Face ``config.json``, refusing in one line what model.py does not implement."""
    architectures = hf.get("architectures") or []
    if "LlamaForCausalLM" not in architectures and not (not architectures and hf.get("model_type") == "llama"):
        found = ", ".join(architectures) or f"model_type={hf.get('model_type')}"
        raise ConfigError(f"{where} holds a {found} model; only LlamaForCausalLM (Llama-architecture) folders "
                          "can be imported")
    rope = hf.get("rope_scaling") or {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where} uses rope scaling '{rope_type}', which model.py does not implement; "
                          "only plain RoPE (rope_scaling null) models can be imported")
    unsupported = [f"{key}={hf[key]}" for key, plain in (("attention_bias", False), ("mlp_bias", False),
                                                         ("hidden_act", "silu")) if hf.get(key, plain) != plain]
    if unsupported:
        raise ConfigError(f"{where} sets {', '.join(unsupported)}, which model.py does not implement")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; it is not a complete Llama config.json")
    # Sizes are integers and the rest numbers (JSON's true is Python's 1): a "4" or 4.5 was model.py's TypeError
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
    numbers = ("rms_norm_eps", "rope_theta", "initializer_range")
    wrong = [f"{key}={hf[key]!r}" for key in (*sizes, *numbers) if hf.get(key) is not None and (
        isinstance(hf[key], bool) or not isinstance(hf[key], int if key in sizes else (int, float)))]
    if wrong:
        raise ConfigError(f"{where} sets {', '.join(wrong)}: a Llama config.json holds integer sizes and numeric "
                          "settings; fix the file, or export the model again")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise ConfigError(f"{where} sets head_dim={hf['head_dim']}, not hidden_size/num_attention_heads={head_dim}; "
                          "model.py derives head_dim from dim and n_heads")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"),
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------------------
def save_hf(model: Transformer, tokenizer: Tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a folder that ``transformers`` loads as ``LlamaForCausalLM`` with a tokenizer equal to ours."""
    check_no_adapters(model)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{model.config.vocab_size}; they must match to export")
    check_convertible(read_spec(tokenizer.model_proto))  # refuse before writing anything
    dtype = model.tok_embeddings.weight.dtype

    def fill(folder: Path) -> None:
        write_json(folder / "config.json", hf_config(model.config, tokenizer, dtype))
        if generation := hf_generation_config(tokenizer):
            write_json(folder / "generation_config.json", generation)
        save_weights(to_hf_state_dict(model), folder / "model.safetensors")
        (folder / "tokenizer.model").write_bytes(tokenizer.model_proto)
        write_json(folder / "tokenizer.json", tokenizer_json(tokenizer))
        write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer, model.config.max_seq_len))

    return write_folder(out, fill, overwrite)


def load_hf(path: str | os.PathLike) -> tuple[Transformer, Tokenizer]:
    """Our model and tokenizer from a local Hugging Face Llama folder (config.json + safetensors + tokenizer.model)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give the folder holding config.json and model.safetensors")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    cfg = model_config_from_hf(read_json(folder / "config.json"), folder / "config.json")
    tokenizer = read_tokenizer(folder)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"{folder}/config.json has vocab_size={cfg.vocab_size} but tokenizer.model has "
                          f"{tokenizer.vocab_size} pieces; models with extra added tokens are not supported")
    names = hf_names(cfg.n_layers)
    ours_by_hf = {theirs: ours for ours, theirs in names.items()}
    state = {}
    for name, tensor in load_weights(folder).items():
        if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue  # derived buffers that older transformers saved; a head that the config ties anyway
        state[ours_by_hf.get(name, name)] = tensor
    model = Transformer(cfg)
    assign_weights(model, state, folder, file_names=names)
    return model.eval(), tokenizer


VERIFY_TEXT = "ROMEO: But soft!\n  What light — 何处的光？ 🙂 12345\n<|user|>hi<|end|>"


def verify_hf(folder: str | os.PathLike, model: Transformer, tokenizer: Tokenizer, text: str = VERIFY_TEXT) -> float:
    """Reload an export with transformers and check it against ``model``/``tokenizer``: the ids of ``text`` must be
    equal and the logits equal within fp32 rounding. Returns the largest logit difference."""
    try:
        import transformers  # optional: only this check needs it
    except ImportError:
        raise ConfigError("verify=true needs transformers; pip install transformers (or drop verify)") from None
    hf_ids = transformers.AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    if hf_ids != tokenizer.encode(text):
        raise ConfigError(f"verification failed: transformers tokenizes {text!r} differently from SentencePiece")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.tensor([tokenizer.encode(text, bos=True)[: model.config.max_seq_len]])
    was_training = model.training
    with torch.no_grad():
        diff = (hf_model(tokens).logits.float() - model.eval()(tokens).float()).abs().max().item()
    model.train(was_training)
    if diff > 1e-3:
        raise ConfigError(f"verification failed: logits differ from transformers' by up to {diff:.2e}")
    return diff
