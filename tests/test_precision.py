import pytest
import torch

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.precision import auto_precision, check_fp16_on_cpu, cpu_precision


def test_hardware_profiles_default_to_the_precision_this_machine_computes_fast_in(compose_train):
    assert compose_train(["hardware=cpu"]).trainer.precision == cpu_precision()
    assert compose_train([]).trainer.precision == cpu_precision()  # auto on this CPU-only machine


@pytest.mark.parametrize("capability, precision", [((8, 9), "bf16-mixed"), ((7, 0), "16-mixed")])
def test_auto_precision_wants_native_bf16(monkeypatch, capability, precision):
    # torch answers is_bf16_supported() True on pre-Ampere GPUs too (emulated, slow): hardware=auto must not pick it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability[0] >= 8)
    assert auto_precision() == precision


@pytest.mark.parametrize(("avx512_bf16", "amx", "precision"),
                         [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")])
def test_cpu_precision_wants_native_bf16(monkeypatch, compose_train, avx512_bf16, amx, precision):
    # A CPU without native bf16 emulates it several times slower than fp32; one with it multiplies bf16 ~2x faster.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cpu_precision() == auto_precision() == precision
    assert compose_train(["hardware=cpu"]).trainer.precision == precision
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert auto_precision() == "32-true"  # an Apple GPU: fp32 (MPS autocast unmeasured), whatever its CPU


def test_fp16_on_a_cpu_needs_fp16_instructions(monkeypatch):
    # Without them torch multiplies fp16 60-400x slower than fp32: a run that seems to hang, refused in one line.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    with pytest.raises(ConfigError, match="^trainer.precision=16-true needs fp16 matmuls, and this CPU has no fp16"):
        check_fp16_on_cpu("cpu", "16-true", "trainer.precision")
    # A GPU; Lightning's 16-mixed, which it runs as bf16-mixed on a CPU; fp32 and bf16; eval's default (None).
    for device_type, precision in [("cuda", "16-true"), ("cpu", "16-mixed"), ("cpu", "32-true"), ("cpu", "bf16-true"),
                                   ("cpu", None)]:
        check_fp16_on_cpu(device_type, precision, "trainer.precision")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)  # AVX512-FP16 or AMX-FP16
    check_fp16_on_cpu("cpu", "16-true", "trainer.precision")
