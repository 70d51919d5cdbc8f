"""lfpl-plot on hand-written run and sweep folders laid out as lfpl-train leaves them (no training needed)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest

from llmfoundry_pl.cli.plot import main, read_metrics
from llmfoundry_pl.cli.sweep_summary import STARTED
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, lr: float = 1e-3, steps: int = 40, overrides: tuple[str, ...] = ()) -> Path:
    """A run folder with a metrics.csv shaped like Lightning's CSVLogger output: one header with every column,
    each row filling only the metrics logged together (learning rates, training, validation, throughput)."""
    header = ["epoch", "lr-AdamW/pg1", "lr-AdamW/pg2", "step", "train/device/items_per_sec", "train/loss",
              "val/bpb", "val/loss"]
    rows = []
    for step in range(steps):
        rate = lr * min(1.0, (step + 1) / 10)
        rows.append(["", rate, rate, step, "", "", "", ""])
        rows.append([0, "", "", step, "", 6.0 - step * lr * 20, "", ""])
        if step % 10 == 9:
            rows.append([0, "", "", step, 8000 + step, "", 4.8 - step * lr * 15, 6.0 - step * lr * 18])
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    (run_dir / ".hydra").mkdir()
    (run_dir / "final_metrics.json").write_text(json.dumps(
        {"overrides": list(overrides), "metrics": {"val/loss": 5.0, "val/bpb": 4.0}}))
    return run_dir


def edit_csv(csv_file: Path, edit) -> None:
    """Rewrite a metrics.csv with ``edit(row)`` for each row (a dict of the columns kept)."""
    with open(csv_file) as f:
        rows = [edit(row) for row in csv.DictReader(f)]
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def saved_figures(monkeypatch) -> list:
    """The figures lfpl-plot goes on to save, as they are saved (laid out and drawn)."""
    from llmfoundry_pl.cli import plot as plot_cli

    figures, save = [], plot_cli._save
    monkeypatch.setattr(plot_cli, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    return figures


def legend(fig) -> list[str]:
    return [t.get_text() for t in (fig.legends[0] if fig.legends else fig.axes[0].get_legend()).get_texts()]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000, path  # a real image, not an empty canvas
    assert not list(path.parent.glob(".*.tmp")), "a temp file was left behind"


def test_plot_run_writes_one_png_per_logged_curve(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "2026-01-01" / "12-00-00")
    series = read_metrics(run / "csv" / "metrics.csv")
    assert len(series["train/loss"]) == 40 and len(series["val/loss"]) == 4 and series["val/loss"][0][0] == 9

    main([str(run)])
    written = sorted(p.name for p in (run / "plots").iterdir())
    assert written == ["bpb.png", "loss.png", "lr.png", "tokens_per_s.png"]  # no MFU or DPO columns: no such PNG
    for png in (run / "plots").iterdir():
        assert_png(png)
    # A run killed mid-write leaves its last row cut short ('3.4e' was a ValueError traceback): the rest is plotted
    csv_file = run / "csv" / "metrics.csv"
    csv_file.write_text(csv_file.read_text() + "0,,,40,,3.4e")
    assert len(read_metrics(csv_file)["train/loss"]) == 40
    # Another run into the same folder that logged no learning rate: the first run's lr.png was left as if its own
    with open(csv_file) as f:
        rows = [{k: v for k, v in row.items() if not k.startswith("lr-")} for row in csv.DictReader(f)][:-1]
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    main([str(run)])
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["bpb.png", "loss.png", "tokens_per_s.png"]


def test_plot_sweep_compares_the_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for job, lr in enumerate((1e-3, 3e-3)):
        fake_run(sweep / str(job), lr=lr, overrides=("hardware=cpu", f"optim.lr={lr}"))
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a job that failed before logging anything

    proc = run_cli("plot", str(sweep), cwd=tmp_path, timeout=120)  # as a user runs it
    assert proc.stdout.split() == [str(sweep / "plots" / "sweep.png")]
    assert_png(sweep / "plots" / "sweep.png")


def test_plot_sweep_draws_only_this_sweeps_logs(tmp_path: Path, monkeypatch) -> None:
    # A sweep into the folder of an earlier one (a fixed hydra.sweep.dir, as recipes/lr_sweep_cpu.sh has): job 1
    # failed this time before logging, and the earlier sweep's job 1 curve was drawn as its own
    sweep = tmp_path / "multirun"
    for job, lr in enumerate((1e-3, 3e-3)):
        fake_run(sweep / str(job), lr=lr, overrides=(f"optim.lr={lr}",))
    for file in sweep.rglob("*"):
        os.utime(file, (file.stat().st_mtime - 3600,) * 2)
    (sweep / STARTED).touch()
    for file in ("csv/metrics.csv", "final_metrics.json"):  # job 0 ran again; job 1 left only what Hydra saves
        (sweep / "0" / file).touch()
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.003\n")
    figures = saved_figures(monkeypatch)
    main([str(sweep)])
    assert legend(figures[0]) == ["0: optim.lr=0.001"]
    assert all(len(ax.get_lines()) == 1 for ax in figures[0].axes)


def test_plot_marks_where_a_curve_stops_being_finite(tmp_path: Path, capsys, monkeypatch) -> None:
    # matplotlib leaves NaN and inf out without a word: a run that diverged looked like a short healthy one
    def diverge(row: dict, column: str, step: int) -> dict:
        if row[column] and int(row["step"]) >= step:
            row[column] = "nan" if int(row["step"]) % 2 else "inf"
        return row

    csv_file = fake_run(tmp_path / "run") / "csv" / "metrics.csv"
    edit_csv(csv_file, lambda row: diverge(diverge(row, "train/loss", 23), "val/loss", 29))
    figures = saved_figures(monkeypatch)
    main([str(csv_file.parents[1])])
    loss = figures[0]
    assert legend(loss) == ["train/loss (not finite from step 23)", "val/loss (not finite from step 29)"]
    marks = [line for line in loss.axes[0].get_lines() if line.get_linestyle() == ":"]  # at the step, in its colour
    assert [(list(m.get_xdata()), m.get_color()) for m in marks] == [
        ([23, 23], loss.axes[0].get_lines()[0].get_color()), ([29, 29], loss.axes[0].get_lines()[2].get_color())]
    assert legend(figures[1]) == ["val/bpb"]  # the others untouched
    err = capsys.readouterr().err
    assert err == f"warning: {csv_file}: NaN or inf in train/loss from step 23, val/loss from step 29, marked on " \
        "the charts (diverged there?)\n"

    # A sweep's job that diverged at its first validation has no finite point at all: it was not in the chart
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", overrides=("optim.lr=0.001",))
    fake_run(sweep / "1", overrides=("optim.lr=10",), steps=10)
    csv_file = sweep / "1" / "csv" / "metrics.csv"
    edit_csv(csv_file, lambda row: diverge(diverge(row, "val/loss", 0), "val/bpb", 0))
    assert math.isnan(read_metrics(csv_file)["val/loss"][0][1])
    main([str(sweep)])
    assert legend(figures[-1]) == ["0: optim.lr=0.001", "1: optim.lr=10 (not finite from step 9)"]
    assert capsys.readouterr().err == f"warning: {sweep}: NaN or inf in job 1 from step 9, marked on the charts " \
        "(diverged there?)\n"


def test_plot_sweep_tells_more_than_ten_jobs_apart(tmp_path: Path, monkeypatch) -> None:
    # matplotlib's ten colours drew job 10 as job 0, and the legend sat on the curves
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    sweep = tmp_path / "multirun"
    for job in range(23):
        fake_run(sweep / str(job), lr=1e-4 * (job + 1), steps=20, overrides=(f"optim.lr={job + 1}e-4",))
    figures = saved_figures(monkeypatch)
    main([str(sweep)])
    (fig,) = figures
    for ax in fig.axes:
        looks = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
        assert len(looks) == 23 and len(set(looks)) == 23
    entries = fig.legends[0].get_lines()
    assert [(e.get_color(), e.get_linestyle()) for e in entries] == [
        (line.get_color(), line.get_linestyle()) for line in fig.axes[0].get_lines()]  # the legend matches
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert not any(fig.legends[0].get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
                   for ax in fig.axes)


def test_plot_sweep_without_validation_draws_train_loss_or_says_what_is_missing(tmp_path, capsys, monkeypatch):
    # trainer.limit_val_batches=0: "no job has logged val/loss or val/bpb yet", where train/loss was there to draw
    sweep = tmp_path / "no_val"
    for job in range(2):
        edit_csv(fake_run(sweep / str(job), overrides=(f"seed={job}",)) / "csv" / "metrics.csv",
                 lambda row: {k: v for k, v in row.items() if not k.startswith("val/")})
    figures = saved_figures(monkeypatch)
    main([str(sweep)])
    assert [ax.get_title() for ax in figures[0].axes] == ["train/loss"]
    # lfpl-bench's jobs log no curves: once the sweep has ended (its summary.md), nothing more is coming
    bench = tmp_path / "bench"
    for job in range(2):
        (bench / str(job) / ".hydra").mkdir(parents=True)
        (bench / str(job) / "final_metrics.json").write_text(json.dumps(
            {"overrides": [f"bench.batch_size={job + 1}"], "metrics": {"tokens_per_s": 100.0}}))
    for ended in (False, True):
        if ended:
            (bench / "summary.md").write_text("| job |\n")
        with pytest.raises(SystemExit):
            main([str(bench)])
        err = capsys.readouterr().err
        assert err.startswith(f"error: no job under {bench} has logged val/loss, val/bpb, train/loss to "
                              "csv/metrics.csv") and err.count("\n") == 1
        assert err.endswith(f"; the sweep has ended, and its jobs' figures are in {bench / 'summary.md'}\n"
                            if ended else " yet\n")


def test_chinese_labels_use_an_installed_cjk_font_or_say_what_to_install(tmp_path: Path, capsys, monkeypatch):
    # A sweep over Chinese prompts was labelled with empty boxes, and matplotlib warned once per character
    from matplotlib import font_manager, rcParams

    from llmfoundry_pl.cli import plot as plot_cli

    sweep = tmp_path / "multirun"
    for job, prompt in enumerate(("你好", "再见")):
        fake_run(sweep / str(job), overrides=(f"sample_prompt='{prompt}'",))
    cjk = {"WenQuanYi Micro Hei", "Noto Sans CJK SC"}
    fonts = [f for f in font_manager.fontManager.ttflist if f.name not in cjk]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", fonts)  # none installed (as on CI)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning per glyph would fail here
        main([str(sweep)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: no installed font has some characters of the labels")
    # One installed (here DejaVu Sans' file under a CJK font's name): matplotlib is given it to fall back to
    dejavu = next(f for f in fonts if f.name == "DejaVu Sans")
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [*fonts, dataclasses.replace(dejavu,
                                                                                           name="Noto Sans CJK SC")])
    seen, save = [], plot_cli._save
    monkeypatch.setattr(plot_cli, "_save", lambda fig, path: seen.append(rcParams["font.family"]) or save(fig, path))
    main([str(sweep)])
    assert seen == [["sans-serif", "Noto Sans CJK SC"]] and rcParams["font.family"] == ["sans-serif"]  # restored


def test_plot_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "missing", empty):
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(folder) in err

    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n")  # started, nothing logged yet
    with pytest.raises(SystemExit):
        main([str(run)])
    assert "has no metrics yet" in capsys.readouterr().err

    # files that are not what lfpl-plot reads or writes were tracebacks
    (run / "csv" / "metrics.csv").write_bytes(b"epoch,step,train/loss\n0,1,\xff\xfe\n")
    for plots_is_a_file in (False, True):
        if plots_is_a_file:
            (run / "plots").write_text("not a folder")
        with pytest.raises(SystemExit):
            main([str(run)])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("is a file, where lfpl-plot writes" in err if plots_is_a_file else
                                         "is not a text file (not UTF-8)" in err)
    bad = tmp_path / "bad"
    (bad / "csv").mkdir(parents=True)
    (bad / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,1,3.4e\n0,2,3.3\n")
    with pytest.raises(SystemExit):  # a bad value before the last row is not a run cut short
        main([str(bad)])
    assert "metrics.csv, line 2: could not convert string to float: '3.4e'" in capsys.readouterr().err
    # a quote left open takes the rest of the file into one field, past csv's 131,072 characters: a traceback
    (bad / "csv" / "metrics.csv").write_text('epoch,step,train/loss\n0,1,"3.4\n' + "0,2,3.3\n" * 20_000)
    with pytest.raises(SystemExit):
        main([str(bad)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field larger than field limit" in err

    # a sweep that logged to TensorBoard only: "has logged nothing yet", where it had, elsewhere
    for job in "01":
        (tmp_path / "tb_sweep" / job / ".hydra").mkdir(parents=True)
        (tmp_path / "tb_sweep" / job / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={job}e-3\n")
        (tmp_path / "tb_sweep" / job / "tensorboard").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "tb_sweep")])
    assert f"(trained with logger=tensorboard? then: tensorboard --logdir {tmp_path / 'tb_sweep'})" in \
        capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(SystemExit):
        main([str(fake_run(tmp_path / "other"))])
    assert "pip install 'llmfoundry-pl[plot]'" in capsys.readouterr().err
