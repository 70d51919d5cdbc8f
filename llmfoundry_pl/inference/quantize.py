"""Post-training quantization for inference: the model's matmul weights stored in 8 or 4 bits instead of 32.

    none         the weights as they are: fp32 as trained, or bf16/fp16 under precision=bf16-true/16-true
    int8         int8 weights (one scale per output row) and int8 activations quantized on the fly per call: integer
                 matmuls through PyTorch's own CPU kernels (fbgemm / oneDNN, ``torch.ao`` dynamic quantization); CPU
    int8_weight  int8 weights (one scale per row), dequantized to the model's dtype for each matmul (torchao); CPU
                 and CUDA
    int4_weight  4-bit weights in groups of 32 sharing a scale and zero point (torchao's CPU int4 kernel); CPU

What is quantized: every ``nn.Linear`` — the seven matrices of each block and the output head, which holds
vocab_size·dim weights, a quarter of the tiny model's. Not the token embedding: it is a table lookup, not a matmul,
so it would save memory but no time (and a head tied to it stays unquantized too, see :func:`quantize`). Norms are
vectors. The KV cache and the activations between layers stay in the model's dtype: fp32, or bf16/fp16 when
:func:`for_inference` casts the model first (``precision=bf16-true``/``16-true``), which is also what torchao's
weight-only modes then compute in (their int4 CPU kernel is several times faster on bf16 than on fp32).

int8 rounds a layer's input with one scale for the whole tensor, so in a batch (``prompt_file``, ``lfpl-serve``)
a row's output depends a little on the rows beside it; the weight-only modes keep rows independent.

Why it can pay: decoding one token reads every weight once for little arithmetic, so on big models the time is
memory traffic, and int8 weights are a quarter of fp32's. On small models the time is per-operation overhead, and
the extra work per matmul (quantizing activations, dequantizing weights) can make decoding slower — measured
figures for both are in docs/benchmarks.md ("Quantized inference").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from llmfoundry_pl.callbacks import HALF_PRECISION
from llmfoundry_pl.config import ConfigError, check_inference_precision, check_quantize
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.precision import check_fp16_on_cpu

INT4_GROUP_SIZE = 32  # weights sharing one scale and zero point; of the kernel's 32/64/128, the most accurate
INT4_ROWS = 16  # output rows the int4 weight packing takes at a time
_DEVICES = {"int8": ("cpu",), "int8_weight": ("cpu", "cuda"), "int4_weight": ("cpu",)}
_WHY = {
    "int8": "its integer matmul kernels are PyTorch's CPU ones (fbgemm / oneDNN)",
    "int8_weight": "torchao's int8 weight-only kernels are CPU and CUDA ones",
    "int4_weight": "torchao's int4 kernel for fp32 models is a CPU one (its CUDA kernels need bf16 weights)",
}


def for_inference(model: Transformer, device: torch.device, precision: str = "32-true",
                  mode: str = "none") -> Transformer:
    """``model`` as lfpl-generate, lfpl-serve and lfpl-eval run it: moved to ``device``, its weights cast to
    ``precision``'s dtype (one of ``config.INFERENCE_PRECISIONS``), then its linear layers quantized by ``mode``
    (torchao's weight-only modes keep the dtype they find for their scales and activations)."""
    check_inference_precision(precision)
    check_fp16_on_cpu(device.type, precision, "precision")
    return quantize(model.to(device=device, dtype=HALF_PRECISION.get(precision, torch.float32)), mode)


def check_quantize_device(mode: str, device: str) -> None:
    """Refuse, in one line, a quantization ``mode`` whose kernels ``device`` lacks, naming a mode that it has."""
    if device in _DEVICES[mode]:
        return
    instead = next((f"use quantize={other}, or " for other, devices in _DEVICES.items() if device in devices), "")
    raise ConfigError(f"quantize={mode} does not run on {device}: {_WHY[mode]}; {instead}run on the CPU (device=cpu; "
                      "lfpl-eval: accelerator=cpu)")


def quantize(model: Transformer, mode: str) -> Transformer:
    """``model`` with its linear layers quantized for inference by ``mode`` (one of ``config.QUANTIZE_MODES``), in
    place, on the device it is on; ``none`` returns it unchanged. Quantize after moving the model to its device,
    and before ``torch.compile``. The result is for inference only: its quantized weights have no gradients.

    A head tied to the embedding (``tie_embeddings``) stays unquantized, in the model's dtype: quantizing it would
    add an int8 copy beside the table the lookup still needs."""
    check_quantize(mode)  # the CLIs' schemas already checked; this is for callers from Python
    if mode == "none":
        return model
    check_quantize_device(mode, model.tok_embeddings.weight.device.type)
    if mode == "int8" and model.tok_embeddings.weight.dtype != torch.float32:
        raise ConfigError("quantize=int8 runs PyTorch's integer kernels between fp32 activations: use "
                          "precision=32-true with it, or quantize=int8_weight")
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and not (name == "output" and model.config.tie_embeddings)]
    model.eval()
    if mode == "int8":
        # torch.ao's dynamic quantization is deprecated in favour of torchao, but torchao's replacement
        # (Int8DynamicActivationInt8WeightConfig) has no integer CPU kernel in eager mode: one 2048×5632 layer at
        # batch 1 took 26 ms with it, 2.7 ms in fp32 and 0.5 ms with these fbgemm kernels (reference CPU, 1 thread).
        # So this path stays while torch ships it, its deprecation warnings silenced: they would only puzzle a user.
        # Per-channel weight scales: each output row gets its own, so rows of small weights keep their resolution.
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            return quantize_dynamic(model, dict.fromkeys(targets, per_channel_dynamic_qconfig), dtype=torch.qint8,
                                    inplace=True)
    if mode == "int4_weight":
        modules = dict(model.named_modules())
        # Groups of INT4_GROUP_SIZE inputs share a scale; torch's int4 packing takes output rows 16 at a time (an
        # output head of a vocabulary such as 32001 was its traceback, "expect N to be dividable by 16").
        narrow = [name for name in targets
                  if modules[name].in_features % INT4_GROUP_SIZE or modules[name].out_features % INT4_ROWS]
        if narrow:
            layer = modules[narrow[0]]
            raise ConfigError(f"quantize=int4_weight needs linear layers whose input width is a multiple of "
                              f"{INT4_GROUP_SIZE} and output width a multiple of {INT4_ROWS}; {narrow[0]} maps "
                              f"{layer.in_features} to {layer.out_features}: use int8_weight")
    quantize_, config = _torchao_config(mode)
    keep = set(targets)
    quantize_(model, config, filter_fn=lambda module, name: name in keep)
    return model


def _torchao_config(mode: str):
    """torchao's ``quantize_`` and the config for ``mode``, or a one-line error saying how to install torchao."""
    try:
        with _quiet_torchao_import():
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError(f"quantize={mode} needs torchao: pip install 'llmfoundry-pl[quant]'") from None
    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings for the whole process.
    if mode == "int8_weight":
        return quantize_, Int8WeightOnlyConfig(set_inductor_config=False)
    # torchao 0.18's only int4 path for fp32 weights on a CPU (_weight_int4pack_mm_for_cpu); its stable
    # Int4WeightOnlyConfig packs for CUDA, XPU or NPU kernels, or needs the mslk package.
    return quantize_, PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, set_inductor_config=False)


@contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """Importing torchao logs a warning for each of its CUDA extensions a CPU-only torch cannot load, and torch a
    deprecation note about one of torchao's types: noise for the kernels used here, so hidden during the import."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored in memory: every tensor of its state dict (a shared tensor once),
    quantized ones with their scales and zero points. Derived buffers (RoPE tables) are not weights."""
    seen: set[int] = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        # torch.ao's quantized linear keeps (weight, bias) as a tuple; the dtype entry beside it holds no data.
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
                seen.add(id(tensor))
                total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.is_quantized:  # torch.ao (per channel, as int8 makes it): int8 values + a scale and zero point per row
        return t.int_repr().nbytes + t.q_per_channel_scales().nbytes + t.q_per_channel_zero_points().nbytes
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: the sum of the tensors it is made of
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()
