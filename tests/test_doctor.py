"""lfpl-doctor as a user runs it: a subprocess, on this machine and on a simulated broken install."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.conftest import run_cli


def test_doctor_json_reports_a_working_install(tmp_path: Path) -> None:
    proc = run_cli("doctor", "--json", cwd=tmp_path, timeout=120)
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["failed"] == []
    for name in ("python", "torch", "lightning", "hydra-core", "omegaconf", "sentencepiece", "torchmetrics",
                 "safetensors"):
        assert report["versions"][name], name
    assert {"flash-attn", "peft", "transformers"} <= set(report["versions"])  # optional: a version or null
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
    assert "FAIL sentencepiece: pip install --force-reinstall 'sentencepiece" in proc.stdout

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
