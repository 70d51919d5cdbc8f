"""``lfpl-doctor``: check that this installation can train, and name the fix for whatever cannot.

    lfpl-doctor            a table: versions, devices, cache disk, a forward + backward smoke test, the configs,
                           and the hardware= profile to use on this machine
    lfpl-doctor --json     the same as one JSON object (for scripts and bug reports)

Exit status 0 when every required check passes, 1 otherwise; each failed check names its fix.

Plain argparse, not a Hydra app like the other commands: it has to run when Hydra, the configs or another
dependency is broken, since those are what it checks. For the same reason it imports nothing but the standard
library at the top, and every check catches its own errors: a broken install gives a FAIL row, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DIST_NAME = "llmfoundry-pl"
# The project's dependencies (pyproject.toml), in the order a reader thinks of them; the installed metadata adds
# any newer ones and the version bounds.
REQUIRED = ("torch", "lightning", "hydra-core", "omegaconf", "sentencepiece", "torchmetrics", "safetensors", "numpy")
# Optional packages → (what they enable, how to get them).
OPTIONAL = {
    "flash-attn": ("FlashAttention kernels on CUDA", "pip install 'llmfoundry-pl[gpu]'"),
    "peft": ("LoRA fine-tuning (lora.enabled=true)", "pip install 'llmfoundry-pl[lora]'"),
    "transformers": ("parity tests and lfpl-export verify=true", "pip install transformers"),
    "tensorboard": ("logger=tensorboard", "pip install tensorboard"),
    "matplotlib": ("lfpl-plot", "pip install 'llmfoundry-pl[plot]'"),
    "fastapi": ("lfpl-serve", "pip install 'llmfoundry-pl[serve]'"),
    "uvicorn": ("lfpl-serve", "pip install 'llmfoundry-pl[serve]'"),
    "torchao": ("quantize=int8_weight / int4_weight", "pip install 'llmfoundry-pl[quant]'"),
    "litdata": ("data=streaming", "pip install 'llmfoundry-pl[streaming]' (with a CPU-only torch, the CPU build of "
                                  "torchvision first: docs/concepts.md)"),
    "hydra-optuna-sweeper": ("hparams_search=optuna", "pip install hydra-optuna-sweeper"),
}
# where the module is not the distribution
IMPORT_NAMES = {"hydra-core": "hydra", "flash-attn": "flash_attn",
                "hydra-optuna-sweeper": "hydra_plugins.hydra_optuna_sweeper"}
CPU_FLAGS = ("sse4_2", "fma", "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8",  # x86 (/proc/cpuinfo "flags")
             "asimd", "sve", "sve2", "bf16", "i8mm")  # ARM (/proc/cpuinfo "Features")
MIN_FREE_GIB, LOW_FREE_GIB = 0.5, 5.0  # the bundled corpus needs megabytes; a real corpus's token files need GBs
SMALL_GPU_GIB = 12  # up to this much memory, the rtx5060 profile's micro-batch × accumulation is the safe choice
# What to try when the smoke test fails on a GPU (on the CPU: reinstall torch).
SMOKE_TEST_FIX = {
    "cuda": "check the driver with nvidia-smi; training on the CPU still works: hardware=cpu",
    "mps": "update macOS and torch (MPS needs macOS 12.3+); training on the CPU still works: hardware=cpu",
}
GIB = 1024**3
# An installed user has no repository to `pip install -e .` in
REINSTALL = ("reinstall llmfoundry-pl as you installed it (pip install --force-reinstall --no-deps llmfoundry-pl; "
             "in a clone: pip install -e .)")


@dataclass
class Check:
    section: str
    name: str
    status: str  # "ok", "warn" (works, but see the fix), "info" (a fact), "FAIL" (a required check failed)
    detail: str
    fix: str | None = None
    data: Any = None  # the facts behind `detail`, for --json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lfpl-doctor", description="Check this installation of llmfoundry-pl: versions, devices, cache disk, "
        "a forward + backward smoke test, the configs, and the hardware= profile to use. Exits 1 if a required "
        "check fails, naming the fix.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    checks = run_checks()
    failed = [c for c in checks if c.status == "FAIL"]
    if args.json:
        hardware = next((c.data for c in checks if c.name == "recommended"), None)
        report = {"ok": not failed, "failed": [c.name for c in failed], "recommended_hardware": hardware,
                  "versions": {c.name: c.data for c in checks if c.section == "versions"},
                  "checks": [asdict(c) for c in checks]}
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(checks)
    raise SystemExit(1 if failed else 0)


def run_checks() -> list[Check]:
    """Every check, in the order a failure should be read: an import that fails explains the rows after it."""
    checks = [check_package(), *check_versions()]
    torch = _try_import("torch")
    if torch is None:
        checks.append(Check("devices", "torch", "FAIL", "skipped: torch does not import", "see versions above"))
        return checks
    checks += check_devices(torch)
    checks.append(check_cache_disk())
    precision = _auto_precision()
    checks.append(check_smoke_test(torch, training_device(torch), precision))
    checks += check_configs()
    checks.append(recommend_hardware(torch, precision))
    return checks


def _auto_precision() -> str:
    """The precision hardware=auto trains in (:func:`llmfoundry_pl.precision.auto_precision`: bf16-mixed only on a GPU
    or CPU with native bf16); 32-true when the package does not import, which the rows above already report."""
    try:
        from llmfoundry_pl.precision import auto_precision
    except Exception:
        return "32-true"
    return auto_precision()


# ------------------------------------------------------------------------------------------------------------------
# Package and versions
# ------------------------------------------------------------------------------------------------------------------
def check_package() -> Check:
    here = str(Path(__file__).resolve().parents[1])
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return Check("package", DIST_NAME, "FAIL", f"imported from {here} but not installed: the lfpl-* commands "
                     "do not exist", "pip install -e . (in the repository)", {"location": here, "version": None})
    return Check("package", DIST_NAME, "ok", f"{dist.version} ({here})", data={"location": here,
                                                                               "version": dist.version})


def check_versions() -> list[Check]:
    python, supported = platform.python_version(), sys.version_info >= (3, 10)  # pyproject's requires-python
    checks = [Check("versions", "python", "ok" if supported else "FAIL", python,
                    None if supported else "use Python 3.10 or newer", python)]
    specifiers = _declared_requirements()
    for dist in [*REQUIRED, *(d for d in specifiers if d not in REQUIRED)]:
        checks.append(_check_distribution(dist, specifiers.get(dist, "")))
    for dist, (use, fix) in OPTIONAL.items():
        check = _check_distribution(dist, "")
        if check.status == "FAIL":  # optional: missing or broken is worth knowing, not a failure
            # installed but broken: the reinstall; the extra's install would answer "Requirement already satisfied"
            fix = fix if check.data is None else check.fix
            check.status, check.fix, check.detail = "info", fix, f"{check.detail} — only for {use}: {fix}"
        checks.append(check)
    return checks


def _declared_requirements() -> dict[str, str]:
    """{distribution: version specifier} of the installed package's required (not extra) dependencies."""
    try:
        from packaging.requirements import Requirement

        requires = importlib.metadata.requires(DIST_NAME) or []
    except Exception:  # not installed (reported by check_package) or no `packaging`: no bounds to check
        return {}
    found = {}
    for line in requires:
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            # lower bound first: ">=2.4,<2.7"
            found[_canonical(req.name)] = ",".join(sorted(map(str, req.specifier), key=lambda s: s[0] != ">"))
    return found


def _check_distribution(dist: str, specifier: str) -> Check:
    """Installed (metadata), importable, and inside the declared version bounds."""
    module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        importlib.import_module(module)
    except Exception as e:  # not only ImportError: a broken C extension can raise anything on import
        origin = _module_origin(module)
        if version is None:
            return Check("versions", dist, "FAIL", "not installed", f"pip install '{dist}{specifier}'")
        return Check("versions", dist, "FAIL", f"{version} installed, but import {module} fails: {_one_line(e)}"
                     + (f" (from {origin})" if origin else ""), reinstall_fix(dist), version)
    if version is None:  # importable without metadata: a source checkout on sys.path, say
        version = getattr(sys.modules[module], "__version__", "unknown")
    if specifier and not _satisfies(version, specifier):
        return Check("versions", dist, "FAIL", f"{version}, but {DIST_NAME} needs {specifier}",
                     f"pip install '{dist}{specifier}'", version)
    return Check("versions", dist, "ok", version + (f" (needs {specifier})" if specifier else ""), data=version)


def reinstall_fix(dist: str) -> str:
    """The pip command that puts an installed distribution back as it is, for one that does not import.

    ``--no-deps``: a forced reinstall also reinstalls every dependency from PyPI, torch included, whose Linux wheel
    there is the multi-GB CUDA build, in place of a CPU one. A CPU build of torch comes from PyTorch's CPU index, for
    the same reason; flash-attn compiles against the installed torch (``--no-build-isolation``, as its README says)."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return f"pip install '{dist}'"
    command = f"pip install --force-reinstall --no-deps '{dist}=={version}'"
    if dist == "torch" and version.endswith("+cpu"):
        command += " --index-url https://download.pytorch.org/whl/cpu"
    if dist == "flash-attn":
        command += " --no-build-isolation"
    return command


def _satisfies(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(version.split("+")[0], prereleases=True)
    except Exception:  # no `packaging`, or a version it cannot parse: do not fail the install over it
        return True


# ------------------------------------------------------------------------------------------------------------------
# Devices and disk
# ------------------------------------------------------------------------------------------------------------------
def check_devices(torch: Any) -> list[Check]:
    checks = []
    hip = getattr(torch.version, "hip", None)  # a ROCm build answers torch.cuda too, with version.cuda None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU-only build"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpu = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
                   "compute_capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8}  # Ampere+
            checks.append(Check("devices", f"cuda:{i}", "ok", f"{gpu['name']}, {gpu['memory_gib']} GiB, compute "
                                f"{gpu['compute_capability']}, bf16 {'yes' if gpu['bf16'] else 'no (16-mixed)'} "
                                f"({build})", data=gpu))
    elif _nvidia_driver_present():
        checks.append(Check("devices", "cuda", "warn", f"an NVIDIA driver is present but torch sees no GPU ({build})",
                            "install a CUDA build of torch matching the driver (https://pytorch.org/get-started/"
                            "locally/), or check nvidia-smi", False))
    else:
        checks.append(Check("devices", "cuda", "info", f"no CUDA GPU ({build})", data=False))
    mps = _mps(torch)
    checks.append(Check("devices", "mps", "ok" if mps else "info", "available (Apple GPU)" if mps else "not available",
                        data=mps))
    checks.append(check_cpu(torch))
    return checks


def check_cpu(torch: Any) -> Check:
    info = _cpuinfo()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = set(info.get("flags", info.get("Features", "")).split())
    cpu = {
        "model": info.get("model name") or _mac_cpu_name() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
        # what torch's own CPU kernels were dispatched to on this CPU (DEFAULT, AVX2, AVX512, ...)
        "torch_capability": torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None,
        "simd": [f for f in CPU_FLAGS if f in flags], "memory_gib": _ram_gib(),
    }
    simd = " ".join(cpu["simd"]) or "(flags not readable here)"
    detail = (f"{cpu['model']}, {usable} of {cpu['cores']} cores usable, torch {cpu['torch_threads']} threads, "
              f"kernels {cpu['torch_capability']}; {simd}"
              + (f"; RAM {cpu['memory_gib']['total']} GiB ({cpu['memory_gib']['available']} free)"
                 if cpu["memory_gib"] else ""))
    return Check("devices", "cpu", "ok", detail, data=cpu)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); {} elsewhere."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _mac_cpu_name() -> str | None:
    if sys.platform != "darwin":
        return None
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _ram_gib() -> dict[str, float] | None:
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = lambda key: int(meminfo[key].split()[0])
        return {"total": round(kib("MemTotal") / 2**20, 1), "available": round(kib("MemAvailable") / 2**20, 1)}
    except (OSError, KeyError, ValueError):
        return None


def _nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def check_cache_disk() -> Check:
    """Free space where tokenizers and token files are cached (conf/paths: $LFPL_CACHE_DIR or the default)."""
    cache = Path(os.environ.get("LFPL_CACHE_DIR", "~/.cache/llmfoundry_pl")).expanduser()
    elsewhere = "free some space, or point the cache elsewhere: export LFPL_CACHE_DIR=/a/bigger/disk"
    try:  # a folder on the way this user may not enter: even asking whether the cache exists fails
        existing = next(p for p in (cache, *cache.parents) if p.exists())  # it is created on first use
        free_gib = round(shutil.disk_usage(existing).free / GIB, 1)
        exists = cache.exists()
    except OSError as e:
        return Check("disk", "cache", "FAIL", f"{cache}: {e.strerror or e}", elsewhere.split(", or ")[1],
                     {"path": str(cache)})
    data = {"path": str(cache), "exists": exists, "free_gib": free_gib}
    where = f"{cache}{'' if exists else ' (created on first use)'}: {free_gib} GiB free"
    unusable = _unwritable(existing)
    if unusable:
        return Check("disk", "cache", "FAIL", f"{cache}: {unusable}", elsewhere.split(", or ")[1], data)
    if free_gib < MIN_FREE_GIB:
        return Check("disk", "cache", "FAIL", where, elsewhere, data)
    if free_gib < LOW_FREE_GIB:
        return Check("disk", "cache", "warn", where + " (enough for the bundled corpus, not for a big one)",
                     elsewhere, data)
    return Check("disk", "cache", "ok", where, data=data)


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder``, or None when they can. A file is created and removed rather than
    asking os.access: root passes os.access everywhere, /proc and read-only mounts included."""
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return f"{folder} is not writable ({e.strerror})"


# ------------------------------------------------------------------------------------------------------------------
# Smoke test, configs, recommendation
# ------------------------------------------------------------------------------------------------------------------
def check_smoke_test(torch: Any, device: str, precision: str = "32-true", steps: int = 3) -> Check:
    """Forward, backward and a few AdamW steps of a tiny Transformer on ``device`` (the one training would pick,
    :func:`training_device`), in the ``precision`` hardware=auto picks there (bf16-mixed, 16-mixed or 32-true): the
    loss must be finite, every weight must get a finite gradient, and the loss must fall on a repeated batch.
    Detection stays outside so that the report's logic can be tested on a machine without the device.

    16-mixed runs fp16 autocast without Lightning's loss scaling: the scaler skips the steps whose gradients
    overflow, which would hide the broken fp16 kernels this looks for (a tiny model's gradients fit fp16 unscaled)."""
    try:
        from llmfoundry_pl.config import ModelConfig
        from llmfoundry_pl.model import Transformer

        start = time.perf_counter()
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 256, (4, 33), device=device)
        losses = []
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        for _ in range(steps):
            # No autocast object at all in fp32: a torch without MPS autocast raises on torch.autocast("mps") even
            # with enabled=False.
            with torch.autocast(device_type=device, dtype=dtype) if dtype else contextlib.nullcontext():
                logits = model(tokens[:, :-1])  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
            losses.append(loss.item())
            if not math.isfinite(losses[-1]) or no_grad:
                raise RuntimeError(f"loss {losses[-1]}, missing or non-finite gradients in {no_grad[:3]}")
            optimizer.step()
        seconds = time.perf_counter() - start
    except Exception as e:
        fix = _import_fix(e) or SMOKE_TEST_FIX.get(device, f"reinstall torch: {reinstall_fix('torch')}")
        return Check("smoke test", "forward+backward", "FAIL", f"on {device}: {_one_line(e)}", fix, {"device": device})
    data = {"device": device, "precision": precision, "losses": losses, "seconds": seconds}
    detail = (f"{device} {data['precision']}: tiny Transformer, {steps} AdamW steps, loss {losses[0]:.3f} → "
              f"{losses[-1]:.3f}, gradients finite, {seconds:.2f} s")
    if losses[-1] >= losses[0]:
        return Check("smoke test", "forward+backward", "FAIL", detail + ": the loss did not fall",
                     f"reinstall torch: {reinstall_fix('torch')}", data)
    return Check("smoke test", "forward+backward", "ok", detail, data=data)


def check_configs() -> list[Check]:
    """The shipped configs compose as lfpl-train composes them, and the bundled corpus is there."""
    checks = []
    try:
        from hydra import compose, initialize_config_module

        from llmfoundry_pl.config import register_configs

        register_configs()
        with initialize_config_module(config_module="llmfoundry_pl.conf", version_base="1.3"):
            cfg = compose(config_name="train")
        checks.append(Check("configs", "train config", "ok", f"composes (model: dim {cfg.model.dim}, "
                            f"{cfg.model.n_layers} layers; trainer.max_steps {cfg.trainer.max_steps})", data=True))
    except Exception as e:
        checks.append(Check("configs", "train config", "FAIL", f"does not compose: {_one_line(e)}",
                            _import_fix(e) or f"fix the file named above, or {REINSTALL}", False))
    # The files themselves, not through llmfoundry_pl.data (the same path as its bundled_corpus_dir): this check
    # should say whether the data was installed even when a dependency of the data code is broken.
    corpus = Path(str(resources.files("llmfoundry_pl.assets") / "shakespeare"))
    files = sorted(corpus.glob("*.txt"))
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    data = {"path": str(corpus), "files": len(files), "megabytes": round(size_mb, 2)}
    if files:
        checks.append(Check("configs", "bundled corpus", "ok", f"{len(files)} plays, {size_mb:.1f} MB", data=data))
    else:
        checks.append(Check("configs", "bundled corpus", "FAIL", f"no .txt files in {corpus}",
                            f"{REINSTALL}, its data included", data))
    return checks


def recommend_hardware(torch: Any, precision: str) -> Check:
    """The conf/hardware profile for this machine (and an override it needs); ``precision`` is the one hardware=auto
    picks here."""
    overrides = ""
    if torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GIB
        if gib <= SMALL_GPU_GIB and precision == "bf16-mixed":
            profile, why = "rtx5060", f"a {gib:.0f} GiB GPU: bf16-mixed, micro-batch 8 × 2 accumulation"
        elif gib <= SMALL_GPU_GIB:  # the rtx5060 profile assumes bf16
            profile, why = "auto", f"a {gib:.0f} GiB GPU without bf16: 16-mixed; lower data.batch_size if it runs out"
        else:  # e.g. a V100 (32 GB) has no native bf16: 16-mixed
            profile, why = "auto", f"a {gib:.0f} GiB GPU: {precision}, the data defaults; raise data.batch_size freely"
    elif _mps(torch):
        profile, why = "m4pro", "an Apple GPU through MPS"
    elif _cpp_compiler_found():
        profile, why = "cpu", f"no GPU: {precision} and torch.compile, which needs a C++ compiler"
    else:  # the cpu profile compiles, and lfpl-train refuses compile=true without a compiler
        profile, overrides = "cpu", " compile=false"
        why = f"no GPU: {precision}; no C++ compiler for torch.compile (install g++ or set CXX: 1.1-1.15x faster)"
    return Check("hardware", "recommended", "info", f"lfpl-train hardware={profile}{overrides}  ({why})", data=profile)


def _cpp_compiler_found() -> bool:
    """Whether lfpl-train's check before compile=true on a CPU (cli.common.require_compiler: Inductor's own compiler
    search, which honours $CXX) passes here. Imported here, not at the top: the doctor must start when the package
    does not import."""
    try:
        import torch

        from llmfoundry_pl.cli.common import require_compiler

        require_compiler(torch.device("cpu"))
    except Exception:  # ConfigError: no compiler; or the package does not import, which the rows above report
        return False
    return True


def training_device(torch: Any) -> str:
    """The device lfpl-train's hardware=auto trains on: CUDA, else MPS, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "mps" if _mps(torch) else "cpu"


def _mps(torch: Any) -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


# ------------------------------------------------------------------------------------------------------------------
# Helpers and output
# ------------------------------------------------------------------------------------------------------------------
def _try_import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception:
        return None


def _module_origin(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
        return spec.origin if spec else None
    except Exception:
        return None


def _import_fix(e: BaseException) -> str | None:
    """The fix for a check that failed because a module does not import, or None if that is not why."""
    while e is not None and not isinstance(e, ImportError):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    if isinstance(e, ModuleNotFoundError) and e.name:
        module = e.name.split(".")[0]
        return f"pip install {next((d for d, m in IMPORT_NAMES.items() if m == module), module)}"
    return "a dependency does not import: fix its FAIL row under versions first"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def _one_line(e: BaseException) -> str:
    """Like config.one_line, with the error's type: the doctor cannot import the package it checks (module doc)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def print_report(checks: list[Check]) -> None:
    """A table (with rich, when it is installed), then every fix."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        Console = None  # noqa: N806
    if Console is not None:
        styles = {"ok": "green", "warn": "yellow", "info": "dim", "FAIL": "bold red"}
        table = Table(title="lfpl-doctor", show_lines=False)
        for column in ("section", "check", "status", "detail"):
            table.add_column(column, overflow="fold")
        for i, c in enumerate(checks):
            if i and c.section != checks[i - 1].section:
                table.add_section()
            first = i == 0 or c.section != checks[i - 1].section
            # escape: "[gpu]" in "pip install 'llmfoundry-pl[gpu]'" is text, not rich markup
            table.add_row(c.section if first else "", c.name, f"[{styles[c.status]}]{c.status}[/]", escape(c.detail))
        Console(width=max(shutil.get_terminal_size((140, 24)).columns, 100)).print(table)
    else:
        widths = [max(len(getattr(c, f)) for c in checks) for f in ("section", "name", "status")]
        for i, c in enumerate(checks):
            section = c.section if i == 0 or c.section != checks[i - 1].section else ""
            print(f"{section:<{widths[0]}}  {c.name:<{widths[1]}}  {c.status:<{widths[2]}}  {c.detail}")
    failed = [c for c in checks if c.status == "FAIL"]
    for c in failed:
        print(f"FAIL {c.name}: {c.fix}")
    for c in checks:
        if c.status == "warn" and c.fix:
            print(f"warn {c.name}: {c.fix}")
    print(f"{len(failed)} required check(s) failed" if failed else "all required checks passed")


if __name__ == "__main__":
    main()
