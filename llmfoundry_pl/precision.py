"""Which precision this machine computes fast in: the default of the hardware profiles, and one-line refusals of a
precision the device would only emulate (slowly enough to look like a hang).

Separate from :mod:`llmfoundry_pl.config`, which holds the schemas and stays free of torch: these functions ask
torch about the hardware. ``conf/hardware`` reaches them through the resolvers ``lfpl.auto_precision`` and
``lfpl.cpu_precision``.
"""

from __future__ import annotations

import torch

from llmfoundry_pl.config import ConfigError


def auto_precision() -> str:
    """Lightning precision for the best device found: bf16-mixed on CUDA with bf16, 16-mixed on older CUDA, 32-true
    on MPS, and :func:`cpu_precision` on a CPU."""
    if torch.cuda.is_available():
        # Native bf16 only (Ampere and later): torch also answers True for older GPUs that emulate it, slowly.
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if torch.backends.mps.is_available():
        return "32-true"
    return cpu_precision()


def cpu_precision() -> str:
    """bf16-mixed on a CPU that multiplies bf16 natively (x86 AVX512-BF16 or AMX), else 32-true.

    Measured on 2-core VMs: an AMD EPYC with AVX512-BF16 multiplies 2048² bf16 matrices at 413 GFLOP/s against 193
    for fp32, and trains 1.4x (tiny, eager) to 1.7x (ref16m, compiled) faster in bf16-mixed; a CPU without it
    (AVX-512 alone) emulates bf16 at ~62 GFLOP/s against ~348 for fp32, several times slower."""
    # torch.cpu's probes (private, but what torch's own CPU kernels consult), absent from older releases.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return "bf16-mixed" if native else "32-true"


def cpu_has_native_fp16() -> bool:
    """Whether this CPU multiplies fp16 natively (AVX512-FP16 or AMX-FP16), by oneDNN's probe, which torch's CPU
    matmuls consult. Without it torch multiplies fp16 on a fallback path: on a 2-core AMD EPYC (AVX512-BF16, no
    fp16) 0.4-2.5 GFLOP/s against 156-159 for fp32 (1024² and 2048²) — an fp16 run there never seems to end."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(probe is not None and probe())


def precision_run_on(device_type: str, precision: str) -> str:
    """The precision Lightning trains ``precision`` in on a device of ``device_type``: 16-mixed on a CPU as
    bf16-mixed (torch's CPU autocast in fp16 is not what Lightning runs; it warns and switches), else as given. What
    lfpl-plan must time and count for a plan of a run on that device."""
    return "bf16-mixed" if device_type == "cpu" and precision == "16-mixed" else precision


def check_fp16_on_cpu(device_type: str, precision: str | None, key: str) -> None:
    """A one-line error for ``precision=16-true`` on a CPU without fp16 instructions; ``key`` names the setting.
    Called by the training and inference entry points before a step runs. (Lightning itself runs 16-mixed on a CPU
    as bf16-mixed.)"""
    if device_type == "cpu" and precision == "16-true" and not cpu_has_native_fp16():
        raise ConfigError(f"{key}={precision} needs fp16 matmuls, and this CPU has no fp16 instructions (AVX512-FP16, "
                          "AMX-FP16): they run 60-400x slower than fp32 here; use a bf16 precision or 32-true")
