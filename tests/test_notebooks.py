"""The teaching notebooks run top to bottom, each in a fresh kernel, as a learner would run them
(``pytest -m notebooks``; .ci/run runs it after the main suite). A notebook that drifts from the package fails here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_within_two_minutes(path: Path, tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LFPL_CACHE_DIR", str(tmp_path / "cache"))
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} is committed with outputs; clear them (they go stale)")
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
                            ).execute()
    assert time.perf_counter() - start < 120, f"{path.name} took more than the 2 minutes a learner is promised"
    markdown = " ".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert "**English.**" in markdown and "**中文。**" in markdown  # every explanation in both languages


def test_there_are_teaching_notebooks():
    assert len(NOTEBOOKS) >= 3
