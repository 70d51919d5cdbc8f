"""The documentation site: every config field documented, the generated reference current, the site builds."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_pl import config

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_every_config_field_has_help() -> None:
    gen = _generator()
    documented = {schema for schema, _, _ in gen.SCHEMAS}
    schemas = {obj for obj in vars(config).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__}
    assert schemas <= documented, f"schemas missing from docs/gen_config_reference.py: {schemas - documented}"
    missing = [f"{schema.__name__}.{f.name}" for schema in documented for f in gen.own_fields(schema)
               if not gen.field_help(f)]
    assert not missing, f"fields without help text (field(metadata={{'help': ...}})): {', '.join(sorted(missing))}"


def test_docs_config_reference_is_current() -> None:
    gen = _generator()
    committed = gen.OUT.read_text(encoding="utf-8") if gen.OUT.exists() else ""
    assert committed == gen.render(), "docs/reference/config.md is stale: run python docs/gen_config_reference.py"


def test_docs_config_option_is_described_by_its_opening_comment_only(tmp_path: Path) -> None:
    gen = _generator()
    option = tmp_path / "option.yaml"
    # A comment on a key (wrapped onto the next line) is about that key: the reference described optim=adamw as
    # "clipping under 16-mixed", the second line of its fused key's comment
    option.write_text("lr: 1.0  # the peak\nfused: null  # null: the fused kernel where faster, the other when\n"
                      "             # clipping under 16-mixed\n")
    assert gen.first_comment(option) == ""
    option.write_text("# @package _global_\n# What this option does, over\n# two lines. More detail.\nlr: 1.0  # x\n")
    assert gen.first_comment(option) == "What this option does, over two lines."


def test_docs_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"


def test_docs_every_recipe_is_listed() -> None:
    """recipes/README.md (also the site's Recipes page) names every script in recipes/: a new recipe is not
    found by reading the folder alone, and the two tables that used to exist drifted apart."""
    table = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    scripts = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "recipes").rglob("*"))
               if p.suffix in {".sh", ".py", ".sbatch"}]
    assert scripts, "no recipe scripts found"
    missing = [s for s in scripts if f"{s}`" not in table]
    assert not missing, f"recipes/README.md does not list {', '.join(missing)}"


def test_docs_hold_no_control_characters() -> None:
    """A LaTeX formula written through a Python string without r"" lost its backslashes to escapes: ``\\frac``
    became a form feed and "rac", ``\\right`` a line break and "ight", and the page showed neither."""
    pages = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md")) + sorted((ROOT / "recipes").rglob("*.md"))
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in pages
           for n, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1)
           if any(ord(c) < 32 and c != "\t" for c in line)]
    assert pages and not bad, f"control characters (a lost backslash?) at {', '.join(bad)}"
