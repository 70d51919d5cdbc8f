"""Every structured-config schema of the project, and ``register_configs()`` that hands them to Hydra.

Each dataclass here is both the single source of truth for a component's settings and the Hydra schema
that checks YAML files and command-line overrides: a misspelt key (``model.n_layer=4``) or a wrong type
(``model.n_layers=two``) fails when the config is composed, naming the key, before any work starts.

Library code receives these dataclasses (``OmegaConf.to_object`` at the entry point), never a ``DictConfig``,
and each component receives only its own part (``cfg.model`` → the model, ``cfg.data`` → the data module).

Lightning's own classes (``Trainer``, callbacks, loggers) keep Lightning's argument names: their schemas are
derived from their signatures in :func:`schema_from_signature` instead of being copied by hand, so
``trainer.max_step=10`` fails at compose time just like our own keys. This module does not import torch;
Lightning (and :mod:`llmfoundry_pl.precision`, which asks torch about the hardware) is imported only inside
:func:`register_configs`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A setting that cannot work. Its message is one line that names the value and the fix."""


def one_line(error: object, limit: int | None = 160) -> str:
    """``error``'s message (often several lines, from a library) on one line of at most ``limit`` characters (None:
    all of it): the part of it quoted inside a ConfigError or a report line."""
    return " ".join(str(error).split())[:limit]


def _help(text: str) -> dict[str, str]:
    """Field metadata carrying the one-line help shown in the docs."""
    return {"help": text}


def _check_positive(group: str, settings: object, names: tuple[str, ...]) -> None:
    """A one-line error for the first setting of ``names`` that is given but not a positive, finite number (`not`
    also catches NaN; inf trained silently, model.rope_theta=inf with no rotation at all). A setting whose default is
    null may be left null, and the error says so."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    for name in names:
        value = getattr(settings, name)
        if value is not None and not 0 < value < math.inf:
            what = "finite" if value == math.inf else "positive"
            or_null = " (or null)" if defaults[name] is None else ""
            raise ConfigError(f"{group}.{name}={value} must be {what}{or_null}")


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
# model.attention: "auto" picks among the others (llmfoundry_pl/model.py: attention_kernel).
ATTENTION_CHOICES = ("auto", "sdpa", "math")
# model.logits: how the loss (training and validation) meets the output head (llmfoundry_pl/loss.py: uses_chunked_loss).
LOGITS_CHOICES = ("auto", "full", "chunked")


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder-only transformer (names follow Meta's Llama / torchtitan).

    Attention heads, as in litgpt's config::

        MHA  n_kv_heads == n_heads      every query head has its own key/value head
        GQA  1 < n_kv_heads < n_heads   groups of query heads share one key/value head (Llama 2 70B, Llama 3)
        MQA  n_kv_heads == 1            all query heads share one key/value head

        q heads:  [0][1][2][3][4][5][6][7]
        GQA kv:   [ 0  ][ 1  ][ 2  ][ 3  ]   (n_heads=8, n_kv_heads=4: each kv head serves 2 query heads)

    Fewer key/value heads means a smaller KV cache at inference with little loss in quality.
    """

    vocab_size: int | None = field(
        default=None,
        metadata=_help("Rows of the embedding; null: the tokenizer's vocabulary size (filled in before the model is "
                       "built)."),
    )
    dim: int = field(default=256, metadata=_help("Width of the residual stream (the embedding size)."))
    n_layers: int = field(default=4, metadata=_help("Number of transformer blocks."))
    n_heads: int = field(default=4, metadata=_help("Number of query heads; head_dim = dim // n_heads."))
    n_kv_heads: int | None = field(
        default=None, metadata=_help("Number of key/value heads (GQA); null means n_heads (plain multi-head).")
    )
    hidden_dim: int | None = field(
        default=None,
        metadata=_help("SwiGLU inner width; null: Llama's rule from dim, multiple_of, ffn_dim_multiplier."),
    )
    multiple_of: int = field(default=64, metadata=_help("Llama's rule rounds hidden_dim up to a multiple of this."))
    ffn_dim_multiplier: float | None = field(
        default=None, metadata=_help("Optional scale on Llama's 8/3·dim hidden width (Llama 3 uses 1.3).")
    )
    norm_eps: float = field(default=1e-5, metadata=_help("Epsilon inside RMSNorm's square root."))
    rope_theta: float = field(default=10000.0, metadata=_help("RoPE base; larger values suit longer contexts."))
    max_seq_len: int = field(default=256, metadata=_help("Longest sequence the model accepts (RoPE table size)."))
    tie_embeddings: bool = field(
        default=False, metadata=_help("Share the token embedding with the output head (saves vocab·dim params).")
    )
    dropout: float = field(default=0.0, metadata=_help("Dropout on attention and residual branches."))
    init_std: float = field(
        default=0.02, metadata=_help("Std of the normal init; residual output projections get std/sqrt(2·n_layers).")
    )
    attention: str = field(
        default="auto",
        metadata=_help("Attention implementation: sdpa (PyTorch's fused kernels), math (the formula written out; "
                       "keeps the T×T scores) or auto — flash-attn on CUDA in fp16/bf16 when installed, math on a "
                       "CPU in bf16 up to 512 positions unless compiled (1.05-1.08× faster eager training steps "
                       "there; torch 2.13 compiles its backward wrong), else sdpa."),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_help("Training: keep only each block's input and recompute its activations in backward — "
                       "memory of one block instead of all, for more compute (base, H100: 65% less memory, 1.8× "
                       "slower)."),
    )
    logits: str = field(
        default="auto",
        metadata=_help("Training and validation loss: full (all B·T·vocab logits at once), chunked (through the "
                       "output head a chunk of tokens at a time, the full logits never in memory: ref16m at vocab "
                       "32k, 8×256, eager: 1.4 instead of 2.5 GB, same speed) or auto — chunked unless the step is "
                       "compiled (compile=true compiles training steps only, where Inductor's fused loss over the "
                       "full logits is faster)."),
    )

    def __post_init__(self) -> None:
        kv_heads_given = self.n_kv_heads is not None
        if not kv_heads_given:
            self.n_kv_heads = self.n_heads
        # (a negative norm_eps makes NaNs, rope_theta <= 0 garbage angles, hidden_dim=0 an MLP of nothing)
        _check_positive("model", self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                        "max_seq_len", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta",
                                        "init_std"))
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                              + _head_count_hint(self.dim, self.n_heads, self.n_kv_heads if kv_heads_given else None))
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim = model.dim / model.n_heads = {self.dim}/{self.n_heads} = {self.head_dim} is odd; "
                "RoPE rotates pairs of channels, so choose dim and n_heads giving an even head_dim"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"model.attention={self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if self.logits not in LOGITS_CHOICES:
            raise ConfigError(f"model.logits={self.logits!r} is not one of {', '.join(LOGITS_CHOICES)}")
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            if self.hidden_dim < 1:  # a small ffn_dim_multiplier rounds it to 0: an MLP of nothing
                raise ConfigError(f"model.ffn_dim_multiplier={self.ffn_dim_multiplier} makes the feed-forward width "
                                  f"0 for dim={self.dim}; raise it, or give model.hidden_dim")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Llama's SwiGLU width: 2/3 of the usual 4·dim (three matrices instead of two keep the parameter count),
    optionally scaled, rounded up to ``multiple_of`` for hardware-friendly matmuls."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def _head_count_hint(dim: int, n_heads: int, n_kv_heads: int | None) -> str:
    """A number of heads to suggest for ``dim``, nearest ``n_heads``, that passes every check below: it divides dim
    into an even head_dim, and is a multiple of ``n_kv_heads`` (when set). A divisor of dim alone was suggested, which
    the next check then refused (5 heads under the tiny preset's 2 key/value heads; 10 heads of 25 channels)."""
    fits = [h for h in range(1, dim + 1) if dim % h == 0 and dim // h % 2 == 0 and h % (n_kv_heads or 1) == 0]
    if not fits:
        return (f"no multiple of model.n_kv_heads={n_kv_heads} divides dim into an even head_dim: pick a model.dim "
                f"divisible by {2 * n_kv_heads}") if n_kv_heads else \
            "no divisor of dim gives an even head_dim: pick an even model.dim"
    nearest = min(fits, key=lambda h: abs(h - n_heads))
    if n_kv_heads:
        return f"pick n_heads among the multiples of model.n_kv_heads={n_kv_heads} dividing dim into an even " \
            f"head_dim (e.g. {nearest})"
    return f"pick n_heads among the divisors of dim giving an even head_dim (e.g. {nearest})"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
DEFAULT_CACHE_DIR = "~/.cache/llmfoundry_pl"


def default_cache_dir() -> str:
    """Where tokenizers, token files and the demo task are cached unless a config says otherwise: ``$LFPL_CACHE_DIR``,
    else :data:`DEFAULT_CACHE_DIR`. conf/paths reads the same variable, so a config built in Python and one composed
    by Hydra share the cache."""
    return os.environ.get("LFPL_CACHE_DIR", DEFAULT_CACHE_DIR)


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how training windows are drawn."""

    path: str | None = field(
        default=None,
        metadata=_help("A text file, a folder (all .txt/.md/.jsonl/.ndjson inside), or a glob; null uses the bundled "
                       "corpus."),
    )
    text_field: str = field(default="text", metadata=_help("Key holding the text in each line of a .jsonl file."))
    vocab_size: int = field(default=4096, metadata=_help("Vocabulary size of the SentencePiece model trained here."))
    tokenizer_path: str | None = field(
        default=None, metadata=_help("An existing SentencePiece .model to use instead of training one.")
    )
    character_coverage: float = field(
        default=0.9995, metadata=_help("Share of characters SentencePiece keeps as symbols; the rest use bytes "
                                       "(0.98 to 1, SentencePiece's range).")
    )
    seq_len: int = field(default=256, metadata=_help("Tokens per training window (the model sees seq_len+1)."))
    batch_size: int = field(default=16, metadata=_help("Windows per micro-batch on each device."))
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes (0 loads in the main process)."))
    val_fraction: float = field(
        default=0.05, metadata=_help("Tail share of every document held out for validation (of documents too short "
                                     "for that to be 64 tokens: one in every 1/val_fraction, whole).")
    )
    val_stride: int | None = field(
        default=None,
        metadata=_help("Validation windows start every val_stride tokens, each scoring only tokens the previous "
                       "did not (more context per token, more compute); null: seq_len, back-to-back windows."),
    )
    seed: int = field(default=1337, metadata=_help("Seed of the window positions (with the step and rank)."))
    cache_dir: str = field(
        default_factory=default_cache_dir,
        metadata=_help("Where tokenizers and token files are cached, keyed by the inputs that made them."),
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction <= 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1]")
        _check_positive("data", self, ("seq_len", "batch_size", "vocab_size"))
        if self.val_stride is not None and not 0 < self.val_stride <= self.seq_len:
            raise ConfigError(f"data.val_stride={self.val_stride} must be between 1 and data.seq_len={self.seq_len}")
        if not 0.98 <= self.character_coverage <= 1.0:  # SentencePiece's own check comes as a C++ traceback
            raise ConfigError(f"data.character_coverage={self.character_coverage} must be between 0.98 and 1 "
                              "(SentencePiece's range)")
        _check_loading(self.num_workers, self.seed)


def _check_loading(num_workers: int, seed: int) -> None:
    """Settings the data loaders would refuse only once built, with a traceback."""
    if num_workers < 0:
        raise ConfigError(f"data.num_workers={num_workers} must be 0 or more (0 loads in the main process)")
    if seed < 0:  # numpy's SeedSequence: "expected non-negative integer"
        raise ConfigError(f"data.seed={seed} must be 0 or more")


# The sizes litdata reads (64MB, 1.5g, 100b): a number and a decimal unit.
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:[kmgt]b?|b)\s*", re.IGNORECASE)

# Where litdata can stream chunks from; `local:` reads a folder through litdata's download cache, as it would a bucket.
CHUNK_URI_PREFIXES = ("s3://", "gs://", "azure://", "local:")


@dataclass
class StreamingDataConfig(DataConfig):
    """``data=streaming``: the text, tokenizer and split of ``data=text``, with the training windows written once as
    litdata chunks and streamed from a folder or an object store (llmfoundry_pl/data/streaming.py)."""

    chunks_dir: str | None = field(
        default=None,
        metadata=_help("The training chunks: a local folder (built there from data.path if it has none yet), or "
                       "an s3://, gs:// or azure:// URI such a folder was uploaded to; null: built in data.cache_dir."),
    )
    chunk_bytes: str = field(
        default="64MB", metadata=_help("Size of each chunk file: the unit that is downloaded, cached and shuffled.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunks_dir is not None and "://" in self.chunks_dir and not self.chunks_dir.startswith(
                CHUNK_URI_PREFIXES):
            raise ConfigError(f"data.chunks_dir={self.chunks_dir} is neither a local folder nor a URI litdata streams "
                              f"from; use one starting with {', '.join(CHUNK_URI_PREFIXES)}")
        size = _SIZE.fullmatch(self.chunk_bytes)  # litdata's own parse comes only when the chunks are written
        if size is None or not float(size[1]) > 0:
            raise ConfigError(f"data.chunk_bytes={self.chunk_bytes} is not a size: give a positive number and a unit "
                              "(B, KB, MB, GB or TB), e.g. 64MB")


@dataclass
class ChatDataConfig:
    """Fine-tuning data from JSONL, tokenized with the model's own tokenizer and the chat template
    (llmfoundry_pl/chat.py). ``data=sft``: conversations, loss on the assistant's replies only. ``data=preference``:
    (prompt, chosen, rejected) triples for DPO."""

    format: str = field(default="sft", metadata=_help("sft (conversations) or preference (prompt, chosen, rejected)."))
    path: str | None = field(
        default=None,
        metadata=_help("Training JSONL file; null: the bundled demo task (which play is this passage from?)."),
    )
    val_path: str | None = field(
        default=None, metadata=_help("Validation JSONL file; null: hold out val_fraction of path (with path=null, "
                                     "the demo task's held-out file).")
    )
    val_fraction: float = field(
        default=0.05, metadata=_help("Share of path's examples held out when val_path is null.")
    )
    seq_len: int = field(default=256, metadata=_help("Longest example in tokens (prompt and reply together)."))
    batch_size: int = field(default=16, metadata=_help("Examples (or packed rows) per micro-batch on each device."))
    overlong: str = field(
        default="truncate",
        metadata=_help("An example longer than seq_len: truncate (keep its start; dropped if no reply token is left; "
                       "a preference pair keeps its replies and the end of its prompt) or drop. How many were "
                       "affected is logged."),
    )
    bad_lines: str = field(
        default="fail", metadata=_help("A malformed JSONL line: fail (stop, naming the line) or skip (count, warn).")
    )
    pack: bool = field(
        default=False,
        metadata=_help("sft: put several short examples in one row of seq_len tokens (attention never crosses "
                       "examples) instead of padding each."),
    )
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes (0 loads in the main process)."))
    seed: int = field(default=1337, metadata=_help("Seed of the example order (with the epoch)."))
    cache_dir: str = field(default_factory=default_cache_dir, metadata=_help("Where the demo task's files are "
                                                                               "built."))

    def __post_init__(self) -> None:
        choices = {"format": ("sft", "preference"), "overlong": ("truncate", "drop"), "bad_lines": ("fail", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _check_positive("data", self, ("seq_len", "batch_size"))
        if self.pack and self.format != "sft":
            raise ConfigError("data.pack=true packs sft examples; preference pairs are not packed")
        _check_loading(self.num_workers, self.seed)


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------------------
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al., 2021) through peft: W x + (alpha / r) · B A x with A (r × in), B (out × r) trained
    and W frozen. Only the adapters are trained and saved, so a fine-tune costs a few MB instead of a model copy."""

    enabled: bool = field(default=False, metadata=_help("Train LoRA adapters instead of all weights (needs peft)."))
    r: int = field(default=8, metadata=_help("Rank of the adapters."))
    alpha: float = field(default=16.0, metadata=_help("Scale: the update is multiplied by alpha / r."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the adapters' input."))
    targets: list[str] = field(
        default_factory=lambda: ["wq", "wk", "wv", "wo"],
        metadata=_help("Linear layers to adapt: attention wq, wk, wv, wo and MLP w1 (gate), w3 (up), w2 (down)."),
    )

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(
                f"lora.targets={list(self.targets)} must be a non-empty list among {', '.join(LORA_TARGETS)}"
            )
        if self.r <= 0:
            raise ConfigError(f"lora.r={self.r} must be positive")
        if not self.alpha > 0:  # alpha=0 scales the adapters' update to nothing: a fine-tune that learns nothing
            raise ConfigError(f"lora.alpha={self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DPOConfig:
    """Direct preference optimisation (Rafailov et al., 2023), used with data=preference."""

    beta: float = field(
        default=0.1,
        metadata=_help("Strength of the pull towards the reference model: larger stays closer to it."),
    )

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be positive")


# --------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to the linear layers' weights only: norms and embeddings are not decayed."""

    lr: float = field(default=3e-3, metadata=_help("Peak learning rate, reached after the warmup."))
    weight_decay: float = field(default=0.1, metadata=_help("Decoupled weight decay on the linear layers' weights."))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=_help("Adam's beta1 and beta2."))
    eps: float = field(default=1e-8, metadata=_help(
        "Adam's epsilon. Under trainer.precision=16-true (AdamW's state in fp16, where 1e-8 is 0) it must be 1e-6 or "
        "more."))
    fused: bool | None = field(
        default=None, metadata=_help("Fused AdamW kernel; null: on CUDA and CPU (measured faster), foreach on MPS and "
                                      "when clipping under 16-mixed (loss-scaled gradients).")
    )

    def __post_init__(self) -> None:
        # torch.optim.AdamW checks these too, but only when the optimizer is built, after the model and data are.
        for name in ("lr", "weight_decay", "eps"):
            if not 0 <= getattr(self, name) < math.inf:  # `not` also refuses NaN
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be a finite number, 0 or more")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9,0.95]")


@dataclass
class SchedulerConfig:
    """Learning rate: linear warmup from lr/(warmup_steps+1), then decay to lr·min_lr_ratio at trainer.max_steps."""

    decay: str = field(default="cosine", metadata=_help("cosine, linear or constant after the warmup."))
    warmup_steps: int = field(default=50, metadata=_help("Optimizer steps of linear warmup."))
    min_lr_ratio: float = field(default=0.1, metadata=_help("Final learning rate as a fraction of the peak."))

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"scheduler.decay={self.decay!r} is not one of cosine, linear, constant")
        if self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps={self.warmup_steps} must be 0 or more")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (a fraction of optim.lr)")


# --------------------------------------------------------------------------------------------------------------
# Paths and entry points
# --------------------------------------------------------------------------------------------------------------
@dataclass
class PathsConfig:
    # Optional: Hydra holds None there while it prints the config (--cfg job --resolve was a traceback)
    output_dir: str | None = field(default=MISSING, metadata=_help("This run's directory (Hydra's output dir)."))
    runs_dir: str = field(
        default="outputs", metadata=_help("Where runs are written; ckpt_path=last searches here for the newest.")
    )
    cache_dir: str = field(default_factory=default_cache_dir, metadata=_help("Tokenizer and token-file cache."))



MODEL_PATH_HELP = "a Lightning .ckpt (or last), a folder written by lfpl-export, or a Hugging Face Llama folder."
QUANTIZE_MODES = ("none", "int8", "int8_weight", "int4_weight")  # see llmfoundry_pl/inference/quantize.py
QUANTIZE_HELP = ("Inference with quantized linear layers: none (fp32), int8 (int8 weights and activations, CPU), "
                 "int8_weight or int4_weight (weight-only, torchao; int4: CPU). Sizes, speeds, bits per byte: "
                 "docs/benchmarks.md.")


# Lightning's names for a model held in one dtype, weights and activations: lfpl-generate's and lfpl-serve's
# precision= (lfpl-eval passes any Lightning precision to its Trainer). See inference.quantize.for_inference.
INFERENCE_PRECISIONS = ("32-true", "bf16-true", "16-true")
INFERENCE_PRECISION_HELP = ("The model's dtype: 32-true (fp32, as trained), bf16-true or 16-true (half the memory; "
                            "bigger models decode faster where the device computes in bf16/fp16 natively).")


def check_inference_precision(precision: str) -> None:
    """A one-line error unless ``precision`` is one of :data:`INFERENCE_PRECISIONS`."""
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision={precision} is not one of {', '.join(INFERENCE_PRECISIONS)}")


def check_quantize(mode: str) -> None:
    """A one-line error unless ``mode`` is one of :data:`QUANTIZE_MODES`. Called by the schemas of lfpl-generate,
    lfpl-eval and lfpl-serve, so a typo fails before a model is loaded, and by ``inference.quantize.quantize`` for
    callers from Python."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode} is not one of {', '.join(QUANTIZE_MODES)}")


def check_stop_strings(stop: Sequence[str]) -> None:
    """A one-line error for an empty stop string: it is found at once, so generation would stop before its first
    token and return nothing. Called by lfpl-generate's schema (before a model is loaded) and by the stop-string
    handling itself (``inference.text``), which the server shares."""
    if any(s == "" for s in stop):
        raise ConfigError(f"stop={list(stop)} holds an empty string, which would end every generation before it "
                          "starts: leave it out")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, min_p: float | None,
                   repetition_penalty: float) -> None:
    """One-line errors for sampling settings that cannot work. Called by lfpl-generate's schema (before a model is
    loaded) and by every generation function (``inference``), which the server shares."""
    if not temperature >= 0:  # "not" catches NaN, which no comparison does
        raise ConfigError(f"temperature={temperature} must be 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be 1 or more (or null for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (or null for no limit)")
    if min_p is not None and not 0 <= min_p < 1:
        raise ConfigError(f"min_p={min_p} must be in [0, 1) (or null)")
    if not repetition_penalty > 0:  # NaN picked the lowest-numbered token seen, every step
        raise ConfigError(f"repetition_penalty={repetition_penalty} must be positive (1 = no penalty)")


@dataclass
class MachineConfig:
    """What the hardware profile's device can hold and do, for ``lfpl-plan`` and the fit check of each profile."""

    name: str = field(default="this machine", metadata=_help("The device, in words."))
    memory_gb: float | None = field(
        default=None,
        metadata=_help("Memory for training tensors per device, GB (1e9 bytes); null: that of this machine's "
                       "device of the planned type (CUDA device memory, MPS recommended working set, or RAM)."),
    )
    peak_tflops: float | None = field(
        default=None,
        metadata=_help("Peak matmul TFLOP/s at the profile's precision; null: this machine's device of the "
                       "planned type: Lightning's table on CUDA, measured on a CPU; unknown on MPS or without one."),
    )
    peak_dtype: str | None = field(
        default=None,
        metadata=_help("What machine.peak_tflops multiplies: bf16, fp16 or fp32. A run in another precision gets "
                       "no time estimate rather than a wrong one; null: the figure is for the run's precision."),
    )
    mfu: float = field(
        default=0.4, metadata=_help("Model FLOPs utilisation expected of a training step, for time estimates.")
    )

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"machine.mfu={self.mfu} must be in (0, 1]")
        _check_positive("machine", self, ("memory_gb", "peak_tflops"))
        if self.peak_dtype not in (None, "bf16", "fp16", "fp32"):
            raise ConfigError(f"machine.peak_dtype={self.peak_dtype} is not one of bf16, fp16, fp32 (or null)")



@dataclass
class TrainConfig:
    """Root schema of ``lfpl-train`` (conf/train.yaml)."""

    model: ModelConfig = field(
        default_factory=ModelConfig, metadata=_help("The model's shape (model=tiny|ref16m|small|base).")
    )
    # DataConfig (data=text), StreamingDataConfig (data=streaming) or ChatDataConfig (data=sft, data=preference):
    # each data file names its schema.
    data: Any = field(
        default=MISSING,
        metadata=_help("The data: DataConfig for data=text, StreamingDataConfig for data=streaming, ChatDataConfig "
                       "for data=sft and data=preference."),
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=_help("AdamW settings (optim=adamw)."))
    scheduler: SchedulerConfig = field(
        default_factory=SchedulerConfig, metadata=_help("Learning-rate warmup and decay (scheduler=cosine|constant).")
    )
    # Lightning objects: typed by the schemas that register_configs() derives from their signatures.
    trainer: Any = field(
        default=MISSING, metadata=_help("Lightning Trainer arguments under their Lightning names (trainer=default).")
    )
    callbacks: Any = field(
        default=None, metadata=_help("Lightning callbacks by name, each with its own arguments; null disables one.")
    )
    logger: Any = field(default=None, metadata=_help("Where metrics are logged (logger=csv|tensorboard|none)."))
    paths: PathsConfig = field(default_factory=PathsConfig, metadata=_help("Run directory and caches."))
    seed: int = field(default=1337, metadata=_help("Global seed (model init, data windows, samples)."))
    ckpt_path: str | None = field(
        default=None,
        metadata=_help("Resume from this checkpoint; 'last': the newest last.ckpt under paths.runs_dir."),
    )
    init_from: str | None = field(
        default=None,
        metadata=_help(f"Start from these weights (fine-tuning), with a fresh optimizer: {MODEL_PATH_HELP}"),
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_help("LoRA adapters for fine-tuning."))
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata=_help("DPO settings, used with data=preference."))
    initial_validation: bool = field(
        default=False, metadata=_help("Validate once before training, to log where fine-tuning starts from (step 0).")
    )
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the training step (model and loss as one graph; validation stays eager). On a CPU it needs a "
        "C++ compiler."))
    keep_freed_memory: bool = field(
        default=True,
        metadata=_help("Linux: malloc keeps freed memory for the next step instead of returning it to the OS "
                       "(~6% faster CPU training steps; resident memory stays at the peak)."),
    )
    sample_prompt: str = field(default="", metadata=_help("Prompt of the sample printed after training."))
    sample_tokens: int = field(default=64, metadata=_help("Tokens in the sample printed after training."))
    machine: MachineConfig = field(
        default_factory=MachineConfig, metadata=_help("The hardware profile's device, for lfpl-plan.")
    )


@dataclass
class BenchSettings:
    """What ``lfpl-bench`` measures (the ``bench.*`` keys)."""

    steps: int = field(default=20, metadata=_help("Timed optimizer steps per contender."))
    warmup: int = field(default=3, metadata=_help("Steps run first and not timed (the first one compiles)."))
    batch_size: int | None = field(default=None, metadata=_help("Sequences per step; null: data.batch_size."))
    seq_len: int | None = field(default=None, metadata=_help("Tokens per sequence; null: data.seq_len."))
    plain: bool = field(
        default=True, metadata=_help("Also time a plain PyTorch loop over the same model and data (one device only).")
    )
    litgpt: bool = field(
        default=True, metadata=_help("Also time litgpt's GPT of the same shape, if installed (one device only).")
    )
    rounds: int = field(
        default=1,
        metadata=_help("Times each contender runs, in turn (Lightning, plain, litgpt, Lightning, ...); the figures "
                       "are the medians, and the spread between rounds shows the machine's noise."),
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 1 or self.rounds < 1:
            raise ConfigError(f"bench.steps={self.steps}, bench.warmup={self.warmup} and bench.rounds={self.rounds} "
                              "must all be 1 or more")
        _check_positive("bench", self, ("batch_size", "seq_len"))  # (0 would have read as null: data.*'s size)


@dataclass
class BenchConfig(TrainConfig):
    """Root schema of ``lfpl-bench`` (conf/bench.yaml): the training config plus ``bench.*``."""

    bench: BenchSettings = field(default_factory=BenchSettings, metadata=_help("What lfpl-bench measures."))


@dataclass
class PlanSettings:
    """What ``lfpl-plan`` estimates (the ``plan.*`` keys)."""

    tokens: float | None = field(
        default=None, metadata=_help("Tokens to train, for the time estimate; null: the run's trainer.max_steps.")
    )
    tokens_per_s: float | None = field(
        default=None,
        metadata=_help("Training throughput per device measured by lfpl-bench (its tokens_per_s, divided by its "
                       "devices: it counts every rank's); null: estimated from machine.peak_tflops × machine.mfu."),
    )

    def __post_init__(self) -> None:
        _check_positive("plan", self, ("tokens", "tokens_per_s"))


@dataclass
class PlanConfig(TrainConfig):
    """Root schema of ``lfpl-plan`` (conf/plan.yaml): the training config plus ``plan.*``."""

    plan: PlanSettings = field(default_factory=PlanSettings, metadata=_help("What lfpl-plan estimates."))


@dataclass
class EvalDataConfig:
    """What ``lfpl-eval`` reads. The tokenizer always comes with the model."""

    path: str | None = field(
        default=None,
        metadata=_help("Text to evaluate in full (file, folder or glob); null: the checkpoint's own validation split."),
    )
    text_field: str = field(default="text", metadata=_help("Key holding the text in each line of a .jsonl file."))
    seq_len: int | None = field(default=None, metadata=_help("Window length; null: the one the model trained on."))
    stride: int | None = field(
        default=None,
        metadata=_help("Sliding window: windows start every stride tokens and score only the tokens the previous one "
                       "did not, so each has at least seq_len-stride tokens of context; null: seq_len (no overlap), "
                       "or for the checkpoint's own split in its own windows, the run's data.val_stride."),
    )
    batch_size: int = field(default=16, metadata=_help("Windows per batch."))
    cache_dir: str = field(default_factory=default_cache_dir, metadata=_help("Token-file cache."))

    def __post_init__(self) -> None:
        # The upper bound of stride (the window length) is known only once the model is: cli/eval.py checks it.
        _check_positive("data", self, ("seq_len", "stride", "batch_size"))


EVAL_TASKS = ("demo",)  # lfpl-eval's task= values (cli/eval.py); null is the text evaluation


@dataclass
class EvalConfig:
    """Root schema of ``lfpl-eval`` (conf/eval.yaml)."""

    ckpt_path: str = field(default=MISSING, metadata=_help(f"Model to evaluate: {MODEL_PATH_HELP}"))
    data: EvalDataConfig = field(default_factory=EvalDataConfig, metadata=_help("The text to score."))
    task: str | None = field(
        default=None,
        metadata=_help("null: loss / perplexity / bits per byte on text (data.*); demo: accuracy on the held-out "
                       "questions of the bundled fine-tuning demo task (which play is this passage from?)."),
    )
    task_limit: int | None = field(default=None, metadata=_help("Score only the first N questions; null: all."))
    accelerator: str = field(default="auto", metadata=_help("cpu, cuda, mps or auto."))
    precision: str | None = field(
        default=None, metadata=_help("Lightning precision: 32-true, bf16-true, 16-true, bf16-mixed or 16-mixed; null: "
                                     "32-true.")
    )
    quantize: str = field(default="none", metadata=_help(QUANTIZE_HELP))

    def __post_init__(self) -> None:
        check_quantize(self.quantize)
        if self.task is not None and self.task not in EVAL_TASKS:
            raise ConfigError(f"task={self.task} is not a known task; use one of {', '.join(EVAL_TASKS)}, or task=null "
                              "for loss / perplexity / bits per byte on text")
        if self.task_limit is not None and self.task_limit < 1:
            raise ConfigError(f"task_limit={self.task_limit} must be at least 1, or null for every question")
        mixed = ("bf16-mixed", "16-mixed")
        if self.precision is not None and self.precision not in (*INFERENCE_PRECISIONS, *mixed):
            raise ConfigError(f"precision={self.precision} is not one of {', '.join((*INFERENCE_PRECISIONS, *mixed))} "
                              "(or null: 32-true)")
        # Under autocast these layers get activations of another dtype than their kernels take (measured on CPU:
        # "expected scalar type Float but found BFloat16"); int8_weight runs under either.
        if self.quantize in ("int8", "int4_weight") and self.precision in mixed:
            fix = "32-true" if self.quantize == "int8" else "32-true or bf16-true"
            raise ConfigError(f"quantize={self.quantize} does not run under autocast (precision={self.precision}): "
                              f"use precision={fix}")


@dataclass
class GenerateConfig:
    """Root schema of ``lfpl-generate`` (conf/generate.yaml)."""

    ckpt_path: str = field(default=MISSING, metadata=_help(f"Model to sample from: {MODEL_PATH_HELP}"))
    prompt: str = field(default="", metadata=_help("Text to continue; empty starts from the beginning-of-text token."))
    prompt_file: str | None = field(
        default=None, metadata=_help("Batch mode: a file of prompts, one per line; prints one JSON line per prompt.")
    )
    batch_size: int = field(default=8, metadata=_help("Prompts of prompt_file generated together."))
    interactive: bool = field(default=False, metadata=_help("Read prompts from stdin, one per line, until EOF "
                                                            "(Ctrl-D). Ctrl-C stops a reply; at the prompt, it "
                                                            "ends the session."))
    chat: bool = field(
        default=False,
        metadata=_help("Each prompt is a user message in the chat template and the output is the assistant's reply; "
                       "with interactive=true the conversation keeps its history."),
    )
    system: str = field(default="", metadata=_help("A system message opening the conversation (needs chat=true)."))
    max_new_tokens: int = field(default=200, metadata=_help("Tokens to generate."))
    temperature: float = field(default=0.8, metadata=_help("Softmax temperature; 0 (or under 1e-5) means greedy."))
    top_k: int | None = field(default=50, metadata=_help("Sample among the k most likely tokens; null for all."))
    top_p: float | None = field(default=None, metadata=_help("Nucleus: the smallest set of tokens with mass top_p."))
    min_p: float | None = field(default=None, metadata=_help("Drop tokens under min_p × the top token's probability."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Above 1 makes tokens already present less likely."))
    stop: list[str] = field(default_factory=list, metadata=_help("Stop before the first of these strings."))
    stream: bool = field(default=False, metadata=_help("Print the text as it is generated."))
    seed: int | None = field(
        default=1337,
        metadata=_help("Seed of the sampler, for reproducible samples (interactive: prompt n samples with seed + n, "
                       "so a prompt typed again gets another sample); null: fresh samples on every run."),
    )
    draft_ckpt_path: str | None = field(
        default=None, metadata=_help("Speculative decoding: a smaller model (any form ckpt_path takes) with the same "
                                     "tokenizer drafts tokens; greedy output stays the model's own (in fp32; "
                                     "not with quantize=int8, refused).")
    )
    draft_tokens: int = field(default=4, metadata=_help("Tokens the draft model guesses per target pass."))
    compile: bool = field(default=False, metadata=_help("torch.compile the model: faster decoding after a slow start."))
    device: str = field(default="auto", metadata=_help("cpu, cuda, mps or auto."))
    precision: str = field(default="32-true", metadata=_help(INFERENCE_PRECISION_HELP))
    quantize: str = field(default="none", metadata=_help(QUANTIZE_HELP))

    def __post_init__(self) -> None:
        check_inference_precision(self.precision)
        check_quantize(self.quantize)
        check_stop_strings(self.stop)
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # torch's seeds: an overflow traceback
            raise ConfigError(f"seed={self.seed} is not a seed torch takes: give one from -2**63 to 2**64 - 1, or "
                              "null")
        for name, least in (("max_new_tokens", 0), ("batch_size", 1), ("draft_tokens", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"{name}={getattr(self, name)} must be {least} or more")
        # Where the prompts come from is one of three; a second source, or stream=true with a batch, was ignored.
        given = {"prompt=": self.prompt != "", "prompt_file=": self.prompt_file is not None,
                 "interactive=true": self.interactive}
        sources = [name for name, is_given in given.items() if is_given]
        if len(sources) > 1:
            raise ConfigError(f"{' and '.join(sources)} both give the prompts; keep one")
        if self.prompt_file is not None and self.draft_ckpt_path is not None:
            raise ConfigError("draft_ckpt_path speeds up one prompt at a time (prompt= or interactive=true); "
                              "prompt_file runs in batches without a draft")
        if self.draft_ckpt_path is not None and self.quantize == "int8":
            raise ConfigError("quantize=int8 scales each call's activations as a whole, so the model checking the "
                              "draft's guesses in one pass answers otherwise than alone; use int8_weight with "
                              "draft_ckpt_path")
        if self.system and not self.chat:
            raise ConfigError("system= opens a chat; without chat=true it was ignored: add chat=true, or put the text "
                              "in prompt=")
        if self.prompt_file is not None and self.stream:
            raise ConfigError("stream=true prints one prompt's text as it comes; prompt_file prints a JSON line per "
                              "prompt when its batch is done: drop stream=true")


@dataclass
class ExportConfig:
    """Root schema of ``lfpl-export`` (conf/export.yaml)."""

    ckpt_path: str = field(default=MISSING, metadata=_help(f"Model to export: {MODEL_PATH_HELP}"))
    format: str = field(
        default="hf",
        metadata=_help("hf: a folder transformers loads as LlamaForCausalLM, with its tokenizer; "
                       "safetensors: our own ModelConfig + weights + tokenizer.model, loadable without Lightning."),
    )
    out: str = field(default=MISSING, metadata=_help("The folder to write."))
    overwrite: bool = field(default=False, metadata=_help("Replace out if it exists and is not empty."))
    verify: bool = field(
        default=False, metadata=_help("format=hf: load the export with transformers and compare logits and tokens.")
    )
    merge_lora: bool = field(
        default=False,
        metadata=_help("A LoRA checkpoint: write base + adapters merged into plain weights (required for one)."),
    )

    def __post_init__(self) -> None:
        if self.format not in ("hf", "safetensors"):
            raise ConfigError(f"format={self.format!r} is not one of hf, safetensors")
        if self.verify and self.format != "hf":
            raise ConfigError("verify=true checks a format=hf export with transformers; drop it for format=safetensors")


@dataclass
class ServeConfig:
    """Root schema of ``lfpl-serve`` (conf/serve.yaml): the OpenAI-compatible server."""

    ckpt_path: str = field(default=MISSING, metadata=_help(f"Model to serve: {MODEL_PATH_HELP}"))
    model_name: str | None = field(
        default=None, metadata=_help("The model's name in the API (the request's model field); null: the path's name.")
    )
    host: str = field(default="127.0.0.1", metadata=_help("Address to bind; 0.0.0.0 opens it to the network."))
    port: int = field(default=8000, metadata=_help("TCP port."))
    max_batch: int = field(default=16, metadata=_help("Requests decoded together (KV-cache slots)."))
    queue_limit: int = field(default=64, metadata=_help("Requests allowed to wait for a slot; beyond: 429."))
    request_timeout_s: float = field(default=120.0, metadata=_help("A generation is cut (finish_reason length) "
                                                                   "after this many seconds."))
    default_max_tokens: int = field(
        default=128, metadata=_help("max_tokens when a request gives none (at most what its prompt leaves of the "
                                    "context).")
    )
    api_key: str | None = field(
        default=None, metadata=_help("Require 'Authorization: Bearer <api_key>' on /v1/ (or set LFPL_API_KEY).")
    )
    max_body_bytes: int = field(default=1_000_000, metadata=_help("Larger request bodies get 413."))
    cors_origins: list[str] = field(default_factory=list, metadata=_help("Origins allowed by CORS; none by default."))
    device: str = field(default="auto", metadata=_help("cpu, cuda, mps or auto."))
    precision: str = field(default="32-true", metadata=_help(INFERENCE_PRECISION_HELP))
    quantize: str = field(default="none", metadata=_help(QUANTIZE_HELP))

    def __post_init__(self) -> None:
        check_inference_precision(self.precision)
        check_quantize(self.quantize)
        for name in ("max_batch", "queue_limit", "default_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be 1 or more")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} is not a TCP port: give one from 1 to 65535")
        if not self.request_timeout_s > 0:  # 0 or less cut every generation at its first token
            raise ConfigError(f"request_timeout_s={self.request_timeout_s} must be positive (seconds)")
        if self.api_key == "":  # LFPL_API_KEY=$KEY with $KEY unset: the server ran open to anyone, silently
            raise ConfigError("api_key is empty (or LFPL_API_KEY is set to nothing), which would leave /v1/ open to "
                              "anyone: give a key, or unset both to serve without one")


# --------------------------------------------------------------------------------------------------------------
# Schemas of Lightning's classes, derived from their signatures
# --------------------------------------------------------------------------------------------------------------
_PLAIN_TYPES = (int, float, bool, str)


def _schema_type(annotation: Any) -> Any:
    """The OmegaConf-checkable type for a signature annotation: plain types (or Optional of one) are kept,
    anything richer (unions, Lightning objects) becomes Any, so the key is still checked but not its type."""
    if annotation in _PLAIN_TYPES:
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN_TYPES and len(typing.get_args(annotation)) == 2:
            return args[0] | None
    return Any


def schema_from_signature(cls: type, exclude: tuple[str, ...] = (), name: str | None = None) -> type:
    """A dataclass with one field per argument of ``cls.__init__`` (same names and defaults) plus ``_target_``,
    for ``hydra.utils.instantiate``. The idea of hydra-zen's ``builds(populate_full_signature=True)``, in a few
    lines, so the schema follows the installed Lightning version instead of a hand-copied list."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))]
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname == "self" or pname in exclude or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = MISSING if param.default is inspect.Parameter.empty else param.default
        if not isinstance(default, (*_PLAIN_TYPES, type(None))) and default is not MISSING:
            default = None  # timedelta, enum, ... defaults: let the class apply its own
        ftype = _schema_type(hints.get(pname, Any))
        if ftype is not Any and default is None:
            ftype = ftype | None
        fields.append((pname, ftype, field(default=default)))
    return dataclasses.make_dataclass(name or f"{cls.__name__}Conf", fields)


# --------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------
def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent; called by each entry point before composing).

    YAML files name their schema first in ``defaults`` (e.g. ``- /schema/trainer@_here_``)."""
    from hydra.core.config_store import ConfigStore
    from lightning import Trainer
    from lightning.pytorch import callbacks as cb
    from lightning.pytorch import loggers
    from omegaconf import OmegaConf

    from llmfoundry_pl import precision
    from llmfoundry_pl.callbacks import (
        LastAndBestCheckpoint,
        LossProgressBar,
        SampleTextCallback,
        StepLearningRateMonitor,
        TokenThroughputMonitor,
    )

    # Resolvers of conf/hardware (llmfoundry_pl.precision imports torch: here, not when this module is imported).
    OmegaConf.register_new_resolver("lfpl.auto_precision", precision.auto_precision, replace=True)
    OmegaConf.register_new_resolver("lfpl.cpu_precision", precision.cpu_precision, replace=True)
    # For the run folders: Hydra creates them from paths.runs_dir as written, and '~/runs' became ./~/runs.
    OmegaConf.register_new_resolver("lfpl.expanduser", os.path.expanduser, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(group="schema", name="data_text", node=DataConfig)
    cs.store(group="schema", name="data_streaming", node=StreamingDataConfig)
    cs.store(group="schema", name="data_chat", node=ChatDataConfig)

    # Objects that the entry point builds itself (callbacks, loggers, plugins) are not Trainer config keys.
    trainer_schema = schema_from_signature(Trainer, exclude=("logger", "callbacks", "plugins"), name="TrainerConf")
    cs.store(group="schema", name="trainer", node=trainer_schema)

    callback_classes = {
        "model_checkpoint": LastAndBestCheckpoint,
        "lr_monitor": StepLearningRateMonitor,
        "progress_bar": LossProgressBar,
        "throughput": TokenThroughputMonitor,
        "sample_text": SampleTextCallback,
        "early_stopping": cb.EarlyStopping,
    }
    cs.store(group="schema", name="callbacks", node=_optional_members("CallbacksConf", callback_classes))
    logger_classes = {"csv": loggers.CSVLogger, "tensorboard": loggers.TensorBoardLogger}
    cs.store(group="schema", name="logger", node=_optional_members("LoggerConf", logger_classes))


def _optional_members(name: str, classes: dict[str, type]) -> type:
    """A schema with one optional member per class: YAML enables a member by filling it, null disables it.
    (A member that is null cannot be filled from the command line, so each optional callback that is off by default
    has a file of its own in conf/callbacks, e.g. callbacks=early_stopping.)"""
    members = [(key, schema_from_signature(c) | None, field(default=None)) for key, c in classes.items()]
    return dataclasses.make_dataclass(name, members)
