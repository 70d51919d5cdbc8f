"""lfpl-doctor as a user runs it: a subprocess, on this machine and on a simulated broken install; and its CUDA
and MPS branches, on simulated GPUs."""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmfoundry_pl.cli import doctor
from tests.conftest import run_cli


def test_doctor_json_reports_a_working_install(tmp_path: Path) -> None:
    proc = run_cli("doctor", "--json", cwd=tmp_path, timeout=120)
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["failed"] == []
    for name in ("python", "torch", "lightning", "hydra-core", "omegaconf", "sentencepiece", "torchmetrics",
                 "safetensors"):
        assert report["versions"][name], name
    # optional: a version or null; the serve, quant and streaming extras and the Optuna search went unmentioned
    assert {"flash-attn", "peft", "transformers", "fastapi", "uvicorn", "torchao", "litdata",
            "hydra-optuna-sweeper"} <= set(report["versions"])
    checks = {c["name"]: c for c in report["checks"]}
    assert {c["section"] for c in report["checks"]} >= {"versions", "devices", "disk", "smoke test", "configs"}
    assert checks["cpu"]["data"]["cores"] >= 1 and isinstance(checks["cpu"]["data"]["simd"], list)
    assert checks["cache"]["data"]["free_gib"] > 0
    smoke = checks["forward+backward"]
    assert smoke["status"] == "ok" and all(math.isfinite(x) for x in smoke["data"]["losses"])
    assert checks["train config"]["status"] == "ok" and checks["bundled corpus"]["data"]["files"] == 13
    cuda = checks.get("cuda:0")
    expected = "cpu" if cuda is None else ("rtx5060" if cuda["data"]["memory_gib"] <= 12 else "auto")
    assert report["recommended_hardware"] in (expected, "m4pro")


def test_doctor_names_the_fix_for_a_broken_dependency(tmp_path: Path, monkeypatch) -> None:
    # A sentencepiece that fails to import, first on the path: what a half-finished or broken install looks like.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sentencepiece.py").write_text("raise ImportError('simulated broken sentencepiece')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow))

    proc = run_cli("doctor", cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # --no-deps: a forced reinstall of its dependencies put PyPI's CUDA torch in place of a CPU build
    version = importlib.metadata.version("sentencepiece")
    assert f"FAIL sentencepiece: pip install --force-reinstall --no-deps 'sentencepiece=={version}'" in proc.stdout

    report = json.loads(run_cli("doctor", "--json", cwd=tmp_path, timeout=120, check=False).stdout)
    assert report["ok"] is False and "sentencepiece" in report["failed"]
    sentencepiece = next(c for c in report["checks"] if c["name"] == "sentencepiece")
    assert "simulated broken sentencepiece" in sentencepiece["detail"] and str(shadow) in sentencepiece["detail"]
    # The configs need the tokenizer code, so they fail too, pointing back at the import that broke.
    configs = next(c for c in report["checks"] if c["name"] == "train config")
    assert configs["status"] == "FAIL" and "versions" in configs["fix"]


def test_doctor_plain_table_without_rich(capsys, monkeypatch) -> None:
    from llmfoundry_pl.cli.doctor import Check, print_report

    monkeypatch.setitem(sys.modules, "rich.console", None)  # as if rich were not installed
    print_report([Check("versions", "torch", "ok", "2.4.0"),
                  Check("versions", "sentencepiece", "FAIL", "not installed", "pip install 'sentencepiece>=0.2'"),
                  Check("disk", "cache", "warn", "/cache: 2.0 GiB free", "export LFPL_CACHE_DIR=/a/bigger/disk")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["versions", "torch", "ok", "2.4.0"]
    assert lines[1].split()[:2] == ["sentencepiece", "FAIL"] and lines[1].index("FAIL") == lines[0].index("ok")
    assert lines[3:] == ["FAIL sentencepiece: pip install 'sentencepiece>=0.2'",
                         "warn cache: export LFPL_CACHE_DIR=/a/bigger/disk", "1 required check(s) failed"]


# ------------------------------------------------------------------------------------------------------------------
# The GPU branches, on this CPU: torch's device queries answer as a CUDA or an Apple machine would
# ------------------------------------------------------------------------------------------------------------------
MIB = 2**20


@pytest.fixture
def smoke_tests(monkeypatch, tmp_path) -> list[tuple[str, str]]:
    """Keep the report to its device logic. The smoke test cannot run on a simulated GPU, so it records the device
    and precision it was given; versions and configs (seconds of imports and composing) are tested above."""
    from llmfoundry_pl.cli import doctor

    given = []

    def smoke_test(torch, device: str, precision: str = "32-true") -> doctor.Check:
        given.append((device, precision))
        return doctor.Check("smoke test", "forward+backward", "ok", f"on {device} (simulated)", data={"device": device})

    monkeypatch.setattr(doctor, "check_smoke_test", smoke_test)
    monkeypatch.setattr(doctor, "check_versions", list)
    monkeypatch.setattr(doctor, "check_configs", list)
    monkeypatch.setenv("LFPL_CACHE_DIR", str(tmp_path))
    return given


def simulate_cuda(monkeypatch, name: str, memory_mib: int, capability: tuple[int, int]) -> None:
    """torch as it answers on a machine with one such NVIDIA GPU (bf16 as torch reports it natively: Ampere+)."""
    import torch

    props = SimpleNamespace(name=name, total_memory=memory_mib * MIB, major=capability[0], minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability[0] >= 8)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def doctor_json(capsys) -> dict:
    from llmfoundry_pl.cli.doctor import main

    with pytest.raises(SystemExit) as exit_:
        main(["--json"])
    report = json.loads(capsys.readouterr().out)
    assert exit_.value.code == (0 if report["ok"] else 1)
    return report


@pytest.mark.parametrize(
    ("name", "memory_mib", "capability", "gpu", "profile", "why"),
    [
        ("NVIDIA GeForce RTX 5060", 8151, (12, 0), {"memory_gib": 8.0, "compute_capability": "12.0", "bf16": True},
         "rtx5060", "a 8 GiB GPU: bf16-mixed, micro-batch 8 × 2 accumulation"),
        ("NVIDIA H100 80GB HBM3", 81559, (9, 0), {"memory_gib": 79.6, "compute_capability": "9.0", "bf16": True},
         "auto", "a 80 GiB GPU: bf16-mixed, the data defaults"),
        ("NVIDIA GeForce RTX 2070", 7982, (7, 5), {"memory_gib": 7.8, "compute_capability": "7.5", "bf16": False},
         "auto", "a 8 GiB GPU without bf16: 16-mixed"),
        ("Tesla V100-SXM2-32GB", 32510, (7, 0), {"memory_gib": 31.7, "compute_capability": "7.0", "bf16": False},
         "auto", "a 32 GiB GPU: 16-mixed, the data defaults"),
    ],
    ids=["rtx5060-8gb", "h100-80gb", "rtx2070-8gb-no-bf16", "v100-32gb-no-bf16"],
)
def test_doctor_on_a_cuda_machine(monkeypatch, capsys, smoke_tests, name, memory_mib, capability, gpu, profile, why):
    simulate_cuda(monkeypatch, name, memory_mib, capability)
    report = doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["cuda:0"]["status"] == "ok" and checks["cuda:0"]["data"] == {"name": name, **gpu}
    bf16 = "yes" if gpu["bf16"] else "no (16-mixed)"
    assert checks["cuda:0"]["detail"] == (f"{name}, {gpu['memory_gib']} GiB, compute {gpu['compute_capability']}, "
                                          f"bf16 {bf16} (CUDA 12.8)")
    assert checks["mps"]["data"] is False
    # on the GPU, in the precision hardware=auto picks there (it was fp32 where that is 16-mixed)
    assert smoke_tests == [("cuda", "bf16-mixed" if gpu["bf16"] else "16-mixed")]
    assert report["recommended_hardware"] == profile and checks["recommended"]["data"] == profile
    assert checks["recommended"]["detail"].startswith(f"lfpl-train hardware={profile}  ({why}")
    assert report["ok"] is True and report["failed"] == []


def test_doctor_on_an_apple_machine(monkeypatch, capsys, smoke_tests):
    import torch

    from llmfoundry_pl.cli import doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(doctor, "_nvidia_driver_present", lambda: False)
    report = doctor_json(capsys)
    checks = {c["name"]: c for c in report["checks"]}
    assert (checks["cuda"]["status"], checks["cuda"]["detail"]) == ("info", "no CUDA GPU (CPU-only build)")
    assert (checks["mps"]["status"], checks["mps"]["detail"], checks["mps"]["data"]) == (
        "ok", "available (Apple GPU)", True)
    assert smoke_tests == [("mps", "32-true")]  # hardware=auto and m4pro train 32-true on MPS
    assert report["recommended_hardware"] == "m4pro"
    assert checks["recommended"]["detail"] == "lfpl-train hardware=m4pro  (an Apple GPU through MPS)"
    assert report["ok"] is True


@pytest.mark.parametrize(("device", "fix"), [("cuda", "nvidia-smi"), ("mps", "macOS")])
def test_doctor_smoke_test_on_a_missing_gpu_names_that_gpu_s_fix(device, fix):
    """The real smoke test, told to use a GPU this machine lacks: a FAIL row with the fix for that GPU."""
    import torch

    from llmfoundry_pl.cli.doctor import check_smoke_test, training_device

    if training_device(torch) == device:
        pytest.skip(f"this machine has {device}")
    check = check_smoke_test(torch, device)
    assert check.status == "FAIL" and check.detail.startswith(f"on {device}: ") and fix in check.fix
    assert check.fix.endswith("training on the CPU still works: hardware=cpu")


def test_doctor_cache_check_fails_where_training_could_not_write(tmp_path: Path, monkeypatch) -> None:
    """The cache must be a folder files can be created in: a path under a file passed as "ok" (os.access and disk
    space said nothing), and lfpl-train then failed to create its token cache."""
    from llmfoundry_pl.cli.doctor import check_cache_disk

    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("LFPL_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    check = check_cache_disk()
    assert check.status == "FAIL" and "is a file, not a folder" in check.detail and "LFPL_CACHE_DIR" in check.fix
    monkeypatch.setenv("LFPL_CACHE_DIR", str(tmp_path / "new" / "cache"))  # created on first use: fine
    check = check_cache_disk()
    assert check.status in ("ok", "warn") and "created on first use" in check.detail
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # the probe leaves nothing behind
    # A folder on the way this user may not enter: asking about the cache raised, and the doctor ended in a traceback
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    check = check_cache_disk()
    assert check.status == "FAIL" and check.detail.endswith(": denied") and "LFPL_CACHE_DIR" in check.fix


def test_doctor_recommends_compile_false_on_a_cpu_without_a_compiler(monkeypatch) -> None:
    import torch

    # The cpu profile compiles, and lfpl-train refuses compile=true without a C++ compiler
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(doctor, "_mps", lambda torch: False)
    assert doctor._cpp_compiler_found()  # this machine's g++ (the compiled tests need it too)
    assert doctor.recommend_hardware(torch, "32-true").detail.startswith("lfpl-train hardware=cpu  (")
    monkeypatch.setattr(doctor, "_cpp_compiler_found", lambda: False)
    check = doctor.recommend_hardware(torch, "32-true")
    assert check.data == "cpu" and check.detail.startswith("lfpl-train hardware=cpu compile=false  (")


def test_doctor_reinstalls_a_broken_package_without_replacing_its_dependencies(monkeypatch) -> None:
    import torch

    from llmfoundry_pl.cli.doctor import check_smoke_test, check_versions, reinstall_fix

    # An optional package installed but broken (flash-attn after a torch upgrade, say): the extra's install command
    # was the fix, and pip answers it "Requirement already satisfied".
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    peft = next(c for c in check_versions() if c.name == "peft")
    version = importlib.metadata.version("peft")
    assert peft.status == "info" and peft.fix == f"pip install --force-reinstall --no-deps 'peft=={version}'"
    # A CPU build of torch comes back from the CPU index: PyPI's Linux torch is the multi-GB CUDA build
    torch_fix = reinstall_fix("torch")
    assert torch_fix.startswith(f"pip install --force-reinstall --no-deps 'torch=={torch.__version__}'")
    assert torch_fix.endswith("--index-url https://download.pytorch.org/whl/cpu") == torch.__version__.endswith("+cpu")
    # The smoke test runs in the precision it is given: fp16 autocast where hardware=auto picks 16-mixed (a T4)
    smoke = check_smoke_test(torch, "cpu", "16-mixed")
    assert smoke.status == "ok" and smoke.data["precision"] == "16-mixed", smoke.detail
