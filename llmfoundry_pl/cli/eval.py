"""``lfpl-eval``: held-out loss, perplexity and bits per byte of a model on any text, or its accuracy on a task.

    lfpl-eval ckpt_path=outputs/.../checkpoints/last.ckpt                     # the run's own validation split
    lfpl-eval ckpt_path=... data.path=my_text_dir/                            # every token of other text
    lfpl-eval ckpt_path=exported_or_hf_folder/ data.path=book.txt data.stride=128   # sliding window, more context
    lfpl-eval ckpt_path=... task=demo task_limit=100                          # demo task accuracy vs chance
    lfpl-eval ckpt_path=... accelerator=cpu quantize=int8                     # what int8 layers cost in bits per byte

``ckpt_path`` is a Lightning checkpoint, a folder written by ``lfpl-export`` or a Hugging Face Llama folder; the
model's own tokenizer is always used. ``task=demo`` scores the held-out questions of the bundled fine-tuning task
("which play is this passage from?", 13 titles) by log-likelihood, as lm-evaluation-harness scores multiple
choice; ``data.*`` is then unused. The last line printed is a JSON object of the metrics.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import lightning as L
import numpy as np
from omegaconf import DictConfig

from llmfoundry_pl.chat import ChatFormat
from llmfoundry_pl.cli.common import (
    load_model,
    pick_device,
    to_dataclass,
)
from llmfoundry_pl.config import (
    INFERENCE_PRECISIONS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
)
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.data.corpus import SPLIT_COUNTS, split_counts
from llmfoundry_pl.data.demo_task import demo_questions
from llmfoundry_pl.inference import choice_accuracy
from llmfoundry_pl.inference.quantize import for_inference, weight_bytes
from llmfoundry_pl.interop import ModelSource
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.precision import check_fp16_on_cpu
from llmfoundry_pl.tokenizer import Tokenizer


def evaluation_data(cfg: EvalConfig, source: ModelSource, model_cfg: ModelConfig, tokenizer: Tokenizer) -> DataConfig:
    """What to evaluate on: with ``data.path`` unset, the validation split of the data the model was trained on;
    otherwise all of ``data.path`` (val_fraction=1)."""
    run_data = (source.run_config or {}).get("data")
    if cfg.data.path is None and run_data is None:
        raise ConfigError(f"ckpt_path={source.path} does not say what it was trained on, so there is no validation "
                          "split to take; give the text to evaluate with data.path=")
    run_data = run_data or {}
    if cfg.data.path is None and "format" in run_data:
        raise ConfigError(f"ckpt_path={source.path} was fine-tuned on {run_data['format']} data, not text; give the "
                          "text to evaluate with data.path=, or score the demo task with task=demo")
    if cfg.data.path is None and run_data.get("chunks_dir"):  # its split is in the chunk folder, not under data.path
        raise ConfigError(f"ckpt_path={source.path} was trained on the chunks at data.chunks_dir="
                          f"{run_data['chunks_dir']}, whose validation split lfpl-eval does not read; give the text "
                          "to evaluate with data.path=")
    seq_len = cfg.data.seq_len if cfg.data.seq_len is not None else run_data.get("seq_len") or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's context max_seq_len={model_cfg.max_seq_len}; "
                          f"give data.seq_len={model_cfg.max_seq_len} or less")
    if cfg.data.stride is not None and not 0 < cfg.data.stride <= seq_len:
        raise ConfigError(f"data.stride={cfg.data.stride} must be between 1 and the window length {seq_len}")
    stride = cfg.data.stride
    if stride is None and cfg.data.path is None and cfg.data.seq_len is None:
        stride = run_data.get("val_stride")  # the run's split in the run's windows: figures comparable with its val/
    common = {"seq_len": seq_len, "val_stride": stride, "batch_size": cfg.data.batch_size,
              "cache_dir": cfg.data.cache_dir, "vocab_size": tokenizer.vocab_size}
    if cfg.data.path is None:
        trained_on = run_data.get("path")  # null: the bundled plays
        # (moved away, it was "data.path=... does not exist": a setting the user had not given)
        if trained_on is not None and not glob.glob(os.path.expanduser(trained_on)):
            raise ConfigError(f"ckpt_path={source.path} was trained on {trained_on}, which is not there now, so its "
                              "validation split cannot be taken; put it back, or give the text to evaluate with "
                              "data.path=")
        return DataConfig(path=trained_on, text_field=run_data.get("text_field", "text"),
                          val_fraction=run_data.get("val_fraction", DataConfig.val_fraction), **common)
    return DataConfig(path=cfg.data.path, text_field=cfg.data.text_field, val_fraction=1.0, **common)


def _warn_if_the_split_changed(source: ModelSource, datamodule: TextDataModule) -> None:
    """The run's own split is rebuilt from the text it names: if that text was edited since, the figures are not
    comparable with the run's val/ metrics, which the user would otherwise take them to be."""
    recorded = (source.run_config or {}).get("data_split")
    datamodule.prepare_data()  # builds (or finds) the split; the Trainer's prepare_data then reads it from the cache
    now = split_counts(datamodule.token_files.meta)
    if recorded and now and recorded != now:
        changed = ", ".join(f"{k} {recorded[k]:,} → {now[k]:,}" for k in SPLIT_COUNTS if recorded[k] != now[k])
        print(f"warning: the text ckpt_path={source.path} was trained on has changed since ({changed}), so this "
              "split is not the one the run validated on and its figures are not comparable with the run's val/ "
              "metrics", file=sys.stderr, flush=True)


def _warn_if_tokens_drop_text(datamodule: TextDataModule, tokenizer: Tokenizer) -> None:
    """Bits per byte divides by the bytes the tokens stand for, which are all of the text's with this project's
    tokenizers (byte fallback, no normalization). An imported tokenizer may normalize (NFKC), squeeze whitespace or
    map characters to ``<unk>``: its tokens then stand for fewer bytes than the text holds, and bits per byte reads
    high, not comparable with lm-evaluation-harness's, which divides by the text's UTF-8 bytes. (A Chinese line
    read as 2 of its 33 bytes: 8.77 bits per byte.) Said when it happens; data.path is all held out here."""
    datamodule.prepare_data()  # builds (or finds) the token files; the Trainer's prepare_data then reads the cache
    files = datamodule.token_files
    counted = tokenizer.text_bytes(np.memmap(files.val_path, dtype=files.dtype, mode="r"))
    if counted != files.meta["bytes"]:
        print(f"warning: the tokenizer keeps {counted:,} of the text's {files.meta['bytes']:,} bytes (it normalizes "
              "text, squeezes whitespace or has no byte fallback), so bits per byte counts the kept bytes only and "
              "is not comparable with other tokenizers' figures; loss and perplexity are unaffected",
              file=sys.stderr, flush=True)


def load_quantized(cfg: EvalConfig) -> tuple[Transformer, Tokenizer, ModelSource]:
    """``load_model`` of ``cfg.ckpt_path``, then with ``cfg.quantize`` its linear layers quantized on the device
    that will run it (quantized weights are packed for one device's kernels, so Lightning must not move them), in
    the dtype of a "-true" ``cfg.precision`` (as lfpl-generate quantizes them)."""
    model, tokenizer, source = load_model(cfg.ckpt_path)
    if cfg.quantize != "none":
        precision = cfg.precision if cfg.precision in INFERENCE_PRECISIONS else "32-true"  # mixed: fp32 weights
        model = for_inference(model, pick_device(cfg.accelerator, key="accelerator"), precision, cfg.quantize)
    return model, tokenizer, source


def evaluate(node: DictConfig) -> dict[str, float]:
    cfg = to_dataclass(node, EvalConfig)  # the schema's checks run here, before any loading
    pick_device(cfg.accelerator, key="accelerator")  # one line if this machine lacks it, not Lightning's traceback
    if cfg.task is not None:
        return evaluate_task(cfg)
    model, tokenizer, source = load_quantized(cfg)
    data_cfg = evaluation_data(cfg, source, model.config, tokenizer)
    lit = LitLlama(model.config, network=model)
    lit.set_tokenizer(tokenizer)
    datamodule = TextDataModule(data_cfg, tokenizer=tokenizer)
    if cfg.data.path is None:
        _warn_if_the_split_changed(source, datamodule)
    else:
        _warn_if_tokens_drop_text(datamodule, tokenizer)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=1, precision=cfg.precision, logger=False, enable_checkpointing=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    check_fp16_on_cpu(trainer.strategy.root_device.type, trainer.precision, "precision")
    metrics = {k: float(v) for k, v in trainer.validate(lit, datamodule=datamodule, verbose=False)[0].items()}
    meta = datamodule.token_files.meta
    what = "validation split of the training data" if cfg.data.path is None else data_cfg.path
    windows = (f"windows of {data_cfg.seq_len} tokens every {data_cfg.val_stride}" if data_cfg.val_stride
               else f"back-to-back windows of {data_cfg.seq_len} tokens")
    size, quantized = weight_bytes(model), "" if cfg.quantize == "none" else f", quantize={cfg.quantize}"
    print(f"\nmodel: {source}{quantized}, weights {size / 1e6:.1f} MB\n"
          f"{what}: {meta['val_tokens']:,} tokens, {windows}\n"
          f"loss {metrics['val/loss']:.4f} | perplexity {metrics['val/ppl']:.2f} | "
          f"bits per byte {metrics['val/bpb']:.4f}")
    record = {"ckpt_path": source.path, "format": source.format, "quantize": cfg.quantize,
              "precision": str(trainer.precision),  # as it ran: Lightning runs 16-mixed on a CPU as bf16-mixed
              "weight_bytes": size, "data": what, "tokens": meta["val_tokens"],
              "seq_len": data_cfg.seq_len, "stride": data_cfg.val_stride or data_cfg.seq_len, **metrics}
    print(json.dumps(record), flush=True)
    return metrics


def evaluate_task(cfg: EvalConfig) -> dict[str, float]:
    """Multiple-choice accuracy on the held-out questions of ``cfg.task`` (the first ``task_limit`` of them)."""
    questions = demo_questions("val")[: cfg.task_limit]
    model, tokenizer, source = load_quantized(cfg)
    chat = ChatFormat(tokenizer)  # a ConfigError if the tokenizer lacks the chat tokens (an imported model)
    # Fabric places the model and applies cfg.precision the way the Trainer does for the text evaluation.
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=1, precision=cfg.precision)
    check_fp16_on_cpu(fabric.device.type, cfg.precision, "precision")
    result = choice_accuracy(fabric.setup_module(model), chat, questions)
    cut = f" ({result['truncated']} cut from the left to fit the context)" if result["truncated"] else ""
    print(f"\nmodel: {source}\ntask {cfg.task}: which play is this passage from? {result['questions']} held-out "
          f"questions, {len(questions[0].choices)} choices each{cut}\n"
          f"accuracy {result['accuracy']:.4f} | chance {result['chance']:.4f}")
    print(json.dumps({"ckpt_path": source.path, "quantize": cfg.quantize, "task": cfg.task,
                      "precision": fabric.strategy.precision.precision,  # as it ran, as the text evaluation's record
                      **result}), flush=True)
    return result
