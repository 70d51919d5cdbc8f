"""The table a multirun ends with (SweepSummary), read from the jobs' folders as lfpl-plot reads them too."""

from __future__ import annotations

import csv
import json
import math
import os
import unicodedata
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmfoundry_pl.cli.sweep_summary import (
    RESULTS,
    STARTED,
    UNFINISHED,
    UNREADABLE,
    SweepSummary,
    collect_rows,
    split_overrides,
    write_final_metrics,
)


def _job(sweep: Path, job: str, overrides: list[str], metrics: dict | None, age_s: float = 0.0) -> None:
    """A job folder as lfpl-train leaves it: the overrides Hydra saved and, if it finished, its results;
    ``age_s`` seconds old."""
    (sweep / job / ".hydra").mkdir(parents=True, exist_ok=True)
    files = [sweep / job / ".hydra" / "overrides.yaml"]
    OmegaConf.save(OmegaConf.create(overrides), files[0])
    if metrics is not None:
        files.append(sweep / job / RESULTS)
        files[-1].write_text(json.dumps({"overrides": overrides, "metrics": metrics}))
    for file in files:
        os.utime(file, (file.stat().st_mtime - age_s,) * 2)


def test_a_sweep_into_a_used_folder_lists_its_own_jobs_only(tmp_path, capsys):
    # An earlier sweep of three rates into the same folder (as the recipes' fixed hydra.sweep.dir)
    for job, lr in enumerate(["5e-4", "2e-3", "8e-3"]):
        _job(tmp_path, str(job), ["model=tiny", f"optim.lr={lr}"], {"val/loss": 5.0 + job}, age_s=3600)
    summary = SweepSummary()
    summary.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    # This one's two jobs: the first finished, the second stopped before writing results, so the folder still
    # holds the earlier job 1's
    _job(tmp_path, "0", ["model=tiny", "optim.lr=1e-4"], {"val/loss": 4.5, "val/pref_acc": 0.75})
    _job(tmp_path, "1", ["model=tiny", "optim.lr=3e-4"], None)
    rows = collect_rows(tmp_path)
    assert [(r["job"], r["overrides"], r.get("val/loss")) for r in rows] == [
        ("0", ["model=tiny", "optim.lr=1e-4"], 4.5), ("1", ["model=tiny", "optim.lr=3e-4"], None)]
    # the stopped job keeps its label: what the sweep varied is still told apart
    assert split_overrides(rows) == (["model=tiny"], ["optim.lr=1e-4", f"optim.lr=3e-4 {UNFINISHED}"])
    summary.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    table = (tmp_path / "summary.md").read_text()
    assert "8e-3" not in table and "| val/loss | val/pref_acc |" in table  # every figure the jobs report
    assert (tmp_path / STARTED).is_file() and "sweep summary" in capsys.readouterr().out


def test_jobs_are_found_wherever_the_sweep_subdir_puts_them(tmp_path, capsys):
    # hydra.sweep.subdir=lr${optim.lr}/s${seed} put the jobs two folders down: the summary found none (a TypeError
    # where the table should be), and lfpl-plot no sweep; with hydra.output_subdir=null a job has no .hydra/ at all
    summary = SweepSummary()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary.on_multirun_end(config)  # nothing yet: said so
    assert "no job of this sweep left results" in capsys.readouterr().out
    summary.on_multirun_start(config)
    _job(tmp_path, "lr0.001/s1", ["optim.lr=0.001", "seed=1"], {"val/loss": 5.0})
    _job(tmp_path, "lr0.001/s2", ["optim.lr=0.001", "seed=2"], {"val/loss": 5.1})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / RESULTS).write_text(json.dumps({"overrides": ["seed=3"], "metrics": {"val/loss": 5.2}}))
    rows = collect_rows(tmp_path)
    assert [r["job"] for r in rows] == ["plain", "lr0.001/s1", "lr0.001/s2"]
    summary.on_multirun_end(config)
    assert "| lr0.001/s2 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(("file", "text"), [(RESULTS, "{cut"), (RESULTS, '{"a": 1}'),
                                          (".hydra/overrides.yaml", "- [unclosed")])
def test_a_job_record_that_is_not_one_is_one_line_naming_it(tmp_path, capsys, file, text):
    # An edited or cut record in a job's folder: JSON's, YAML's or a KeyError's traceback. The table needs every
    # record: one error line. lfpl-plot draws from the CSV logs: one warning line, and that job's curve unlabelled
    # by its figures (it refused the whole sweep)
    from llmfoundry_pl.cli.plot import main as plot_main
    from tests.test_plot import fake_run

    fake_run(tmp_path / "0", overrides=("model=tiny", "optim.lr=0.001"))
    fake_run(tmp_path / "1", overrides=("model=tiny", "optim.lr=0.003"))
    _job(tmp_path, "1", ["model=tiny", "optim.lr=0.003"], None)
    if file != RESULTS:  # a job without results, whose saved overrides are the record
        (tmp_path / "1" / RESULTS).unlink()
    (tmp_path / "1" / file).write_text(text)
    message = f"{tmp_path / '1' / file} is not a record a sweep's job wrote ("
    with pytest.raises(SystemExit) as exit_:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}")

    plot_main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'plots' / 'sweep.png'}\n" and err.count("\n") == 1
    assert err.startswith(f"warning: {message}")
    unreadable: list[str] = []
    rows = collect_rows(tmp_path, unreadable)
    assert len(unreadable) == 1 and unreadable[0].startswith(message)
    # the overrides Hydra saved still label it where they can be read
    label = "optim.lr=0.003" if file == RESULTS else "-"
    assert split_overrides(rows)[1] == ["optim.lr=0.001" if file == RESULTS else "model=tiny optim.lr=0.001",
                                        f"{label} {UNREADABLE}"]


def test_a_diverged_jobs_record_is_strict_json(tmp_path, capsys):
    # Python wrote NaN, which is not JSON: JavaScript's JSON.parse and strict parsers refused the file
    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    write_final_metrics(tmp_path / "0", {"val/loss": float("nan"), "val/ppl": math.inf, "tokens_per_s": 10.0},
                        diverged="training diverged", initial_metrics={"val/loss": -math.inf})
    write_final_metrics(tmp_path / "1", {"val/loss": 4.5})
    record = strict((tmp_path / "0" / RESULTS).read_text())
    assert record["metrics"] == {"val/loss": None, "val/ppl": None, "tokens_per_s": 10.0}
    assert record["initial_metrics"] == {"val/loss": None} and record["diverged"] == "training diverged"
    # the table still reads nan for it, as the troubleshooting page says, its status telling why
    rows = collect_rows(tmp_path)
    assert math.isnan(rows[0]["val/loss"]) and rows[0]["status"] == "(diverged)" and rows[1]["val/loss"] == 4.5
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "| 0   | - (diverged) | nan" in (tmp_path / "summary.md").read_text()
    assert [r["val/loss"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["nan", "4.5"]


def test_values_with_spaces_and_wide_characters_stay_whole_and_aligned(tmp_path):
    # Rows held the overrides joined by spaces and split them again at any whitespace: a quoted value with a space
    # (or an ideographic one, U+3000) was cut in two, half of it "common to all jobs"; and Chinese cells, two
    # terminal columns each, slid the table's columns apart
    summary = SweepSummary()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    summary.on_multirun_start(config)
    prompts = ["sample_prompt='第一章\u3000开端'", "sample_prompt='ROMEO said'"]
    for job, prompt in enumerate(prompts):
        _job(tmp_path, str(job), [prompt, "optim.lr=0.001"], {"val/loss": 5.0 + job})
    assert split_overrides(collect_rows(tmp_path)) == (["optim.lr=0.001"], prompts)
    summary.on_multirun_end(config)
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0] == "common to all jobs: optim.lr=0.001"
    rows = table[2:]
    assert prompts[0] in rows[2] and prompts[1] in rows[3]
    # every "|" at the same terminal column: wide characters count two
    columns = [[sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line[:i]) for i, c in
                enumerate(line) if c == "|"] for line in rows]
    assert all(c == columns[0] for c in columns)
    assert [r["overrides"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == [
        f"{p} optim.lr=0.001" for p in prompts]

