"""``lfpl-plot``: PNG curves from a run's CSV log, or one chart comparing the runs of a sweep.

    lfpl-plot outputs/2026-11-22/21-30-19-664210     → <run>/plots/loss.png, bpb.png, lr.png, tokens_per_s.png, ...
    lfpl-plot outputs/multirun/2026-11-22/21-40-02-118537 → <sweep>/plots/sweep.png: every job's val/loss and val/bpb
                                                             (train/loss where no job validated)

It reads ``csv/metrics.csv``, which every run writes with the default ``logger=csv``. To watch a run while it
trains, use TensorBoard instead (``lfpl-train logger=tensorboard``, then ``tensorboard --logdir outputs``);
lfpl-plot is for afterwards: files to keep, compare and put in a report. Only the curves whose columns the log has
are drawn (a DPO run has preference accuracy, a run without the throughput callback has no tokens/s). A curve that
stops being finite (a run that diverged) is marked from that step, and said so once.

Plain argparse rather than Hydra: its one input is a folder, and there is nothing to compose.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmfoundry_pl.cli.sweep_summary import collect_rows, fresh_files, split_overrides
from llmfoundry_pl.files import atomic_write_bytes

# One PNG per entry: file name, y-axis label, the columns drawn on it (those present). Lightning's
# LearningRateMonitor names its columns lr-<optimizer>/pg<N>, matched by the prefix "lr-".
RUN_CHARTS = (
    ("loss", "loss (nats per token)", ("train/loss", "val/loss")),
    ("bpb", "bits per byte", ("train/bpb", "val/bpb")),
    ("lr", "learning rate", ("lr-",)),
    # The throughput callback (Lightning's metric names): items are tokens; items_per_sec (all devices) is logged
    # only when there are several.
    ("tokens_per_s", "tokens/s", ("train/items_per_sec", "train/device/items_per_sec")),
    ("mfu", "model FLOPs utilisation", ("train/device/mfu",)),
    ("pref_acc", "preference accuracy (DPO)", ("val/pref_acc",)),
    ("reward_margin", "reward margin (DPO)", ("train/reward_margin", "val/reward_margin")),
)
SWEEP_METRICS = ("val/loss", "val/bpb")
SWEEP_FALLBACK = ("train/loss",)  # drawn where no job validated (trainer.limit_val_batches=0)
# A sweep job's look: tab10's colours, then, for every ten jobs more, another line style and marker (4 and 5 of
# them: 200 jobs told apart). matplotlib's cycle drew job 10 as job 0.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")
# Fonts with Chinese, Japanese and Korean characters that Linux, macOS and Windows ship or install
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Malgun Gothic")
Series = dict[str, list[tuple[int, float]]]  # column → (step, value) for the rows where it was logged


class PlotError(Exception):
    """A folder lfpl-plot cannot use; its message is one line naming the folder and what to give instead."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lfpl-plot", description="Write PNG curves from a run's csv/metrics.csv into <run>/plots/, or, for a "
        "sweep folder (outputs/multirun/...), one chart comparing its jobs' val/loss and val/bpb.")
    parser.add_argument("path", metavar="RUN_DIR_OR_SWEEP_DIR", type=Path)
    args = parser.parse_args(argv)
    try:
        written = plot(args.path)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(path)


def plot(path: Path) -> list[Path]:
    """The PNGs written for ``path``: a run folder or a sweep folder."""
    if not path.is_dir():
        raise PlotError(f"{path} is not a folder; give a run folder (outputs/<date>/<time>) or a sweep folder "
                        "(outputs/multirun/<date>/<time>)")
    if (path / "plots").exists() and not (path / "plots").is_dir():
        raise PlotError(f"{path / 'plots'} is a file, where lfpl-plot writes its PNGs into a folder of that name; "
                        "move the file away")
    figure = _figure_class()
    with _fonts_for_any_script():
        if (path / "csv" / "metrics.csv").is_file():
            return plot_run(path, figure)
        # Job folders below it, wherever hydra.sweep.subdir put them, .hydra/ or not. A job's final_metrics.json
        # that cannot be read costs that job its label, not the chart: the curves come from the CSV logs.
        unreadable: list[str] = []
        if rows := collect_rows(path, unreadable):
            for message in unreadable:
                print(f"warning: {message}", file=sys.stderr)
            return plot_sweep(path, rows, figure)
    hint = " (trained with logger=tensorboard? then: tensorboard --logdir " + str(path) + ")" \
        if (path / "tensorboard").is_dir() else ""
    raise PlotError(f"{path} holds neither a run's csv/metrics.csv nor a sweep's job folders{hint}")


def read_metrics(csv_path: Path) -> Series:
    """Every logged column of a Lightning CSVLogger file as its (step, value) points. Each row holds only the
    metrics logged together (train metrics, validation metrics, learning rates), so most cells are empty."""
    series: Series = {}
    unreadable = None  # (line, error) of a row that does not parse: fine as the last one, which a killed run cut
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if unreadable:
                    raise PlotError(f"{csv_path}, line {unreadable[0]}: {unreadable[1]}; it is not a CSV file "
                                    "Lightning wrote, or it was edited")
                step = row.get("step")
                if not step:
                    continue
                try:
                    points = [(column, (int(float(step)), float(value))) for column, value in row.items()
                              if column not in ("step", "epoch") and value not in ("", None)]
                except (TypeError, ValueError) as e:  # a cell cut short ('3.4e'), or a row of too few cells
                    unreadable = (reader.line_num, e)
                    continue
                for column, point in points:
                    series.setdefault(column, []).append(point)
    except UnicodeDecodeError:
        raise PlotError(f"{csv_path} is not a text file (not UTF-8); it is not a CSV file Lightning wrote") from None
    except csv.Error as e:  # a quote left open swallows the rest of the file into one field, past csv's limit
        raise PlotError(f"{csv_path}: {e}; it is not a CSV file Lightning wrote, or it was edited") from None
    return series


def plot_run(run_dir: Path, figure: type) -> list[Path]:
    series = read_metrics(run_dir / "csv" / "metrics.csv")
    run_name = "/".join(run_dir.resolve().parts[-2:])  # outputs/<date>/<time> → <date>/<time>
    written, not_finite = [], {}
    for name, ylabel, wanted in RUN_CHARTS:
        columns = [c for c in series if any(c == w or (w.endswith("-") and c.startswith(w)) for w in wanted)]
        if not columns:
            continue
        fig = figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.subplots()
        for column, label in _labels_without_repeats(columns, series).items():
            step = _draw(ax, series[column], label, marker="o" if len(series[column]) <= 30 else None)
            if step is not None:
                not_finite[column] = step
        _finish(ax, ylabel, f"{ylabel} — {run_name}")
        ax.legend()
        written.append(_save(fig, run_dir / "plots" / f"{name}.png"))
    if not written:
        raise PlotError(f"{run_dir / 'csv' / 'metrics.csv'} has no metrics yet; plot it once training has logged")
    _warn_not_finite(run_dir / "csv" / "metrics.csv", not_finite)
    for name, _, _ in RUN_CHARTS:  # an earlier run's chart in this folder (a fixed hydra.run.dir) is not this one's
        stale = run_dir / "plots" / f"{name}.png"
        if stale not in written:
            stale.unlink(missing_ok=True)
    return written


def plot_sweep(sweep_dir: Path, rows: list[dict], figure: type) -> list[Path]:
    """One figure, a panel per metric, a curve per job labelled by the overrides that set it apart. ``rows``:
    :func:`~llmfoundry_pl.cli.sweep_summary.collect_rows`'s."""
    _, labels = split_overrides(rows)
    fresh = fresh_files(sweep_dir)  # a job that failed early this time left an earlier sweep's log, not its own
    jobs = [(r["job"], f"{r['job']}: {label}", read_metrics(sweep_dir / r["job"] / "csv" / "metrics.csv"))
            for r, label in zip(rows, labels, strict=True) if fresh(sweep_dir / r["job"] / "csv" / "metrics.csv")]
    metrics = [m for m in SWEEP_METRICS if any(m in series for *_, series in jobs)] or \
        [m for m in SWEEP_FALLBACK if any(m in series for *_, series in jobs)]
    if not metrics:
        wanted = ", ".join(SWEEP_METRICS + SWEEP_FALLBACK)
        if not jobs and any((sweep_dir / r["job"] / "tensorboard").is_dir() for r in rows):
            hint = f" (trained with logger=tensorboard? then: tensorboard --logdir {sweep_dir})"
        elif fresh(sweep_dir / "summary.md"):  # written as the sweep ended: nothing more is coming
            hint = f"; the sweep has ended, and its jobs' figures are in {sweep_dir / 'summary.md'}"
        else:
            hint = " yet"
        raise PlotError(f"no job under {sweep_dir} has logged {wanted} to csv/metrics.csv{hint}")
    fig = figure(figsize=(6.5 * len(metrics), 4.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    styles = [{"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)],
               "marker": MARKERS[i // 10 % len(MARKERS)]} for i in range(len(jobs))]
    not_finite: dict[str, int] = {}  # "job <job>" → the first step at which one of its curves is not finite
    for ax, metric in zip(axes, metrics, strict=True):
        for (job, label, series), style in zip(jobs, styles, strict=True):
            step = _draw(ax, series[metric], label, **style) if metric in series else None
            if step is not None:
                not_finite[f"job {job}"] = min(step, not_finite.get(f"job {job}", step))
        _finish(ax, metric, metric)
    # One legend for all panels, beside them rather than over the curves: an entry per job, styled as its curves
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (the PNGs' own backend)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], markersize=3, label=label + _not_finite_note(not_finite.get(f"job {job}")), **style)
               for (job, label, series), style in zip(jobs, styles, strict=True) if any(m in series for m in metrics)]
    legend = fig.legend(handles=handles, loc="outside right upper", fontsize="small",
                        ncols=math.ceil(len(handles) / 20))
    # The figure widens by the legend's own width (and grows as tall as it), so the panels keep theirs: a fixed
    # share squeezed them to a third with long labels, and 45 jobs collapsed them ("axes sizes collapsed to zero").
    box = legend.get_window_extent(FigureCanvasAgg(fig).get_renderer())  # its text's size: no layout needed
    fig.set_size_inches(6.5 * len(metrics) + box.width / fig.dpi + 0.3, max(4.5, box.height / fig.dpi + 0.3))
    _warn_not_finite(sweep_dir, not_finite)
    return [_save(fig, sweep_dir / "plots" / "sweep.png")]


def _draw(ax, points: list[tuple[int, float]], label: str, **style) -> int | None:
    """Draw one curve; return the step from which it is not finite (None if it stays so), marked by a dotted line
    in its colour and noted in its label. matplotlib leaves NaN and inf out without a word: a run that diverged
    looked like a short healthy one."""
    step = next((s for s, v in points if not math.isfinite(v)), None)
    steps, values = zip(*points, strict=True)
    finite = [v if math.isfinite(v) else math.nan for v in values]  # inf too: a gap, not a line off the chart
    (line,) = ax.plot(steps, finite, label=label + _not_finite_note(step), markersize=3, **style)
    if step is not None:
        ax.axvline(step, color=line.get_color(), linestyle=":", linewidth=1.5)
    return step


def _not_finite_note(step: int | None) -> str:
    return "" if step is None else f" (not finite from step {step})"


def _warn_not_finite(where: Path, not_finite: dict[str, int]) -> None:
    """One line for every curve that stops being finite: the charts mark it, and the run or job diverged there."""
    if not_finite:
        curves = ", ".join(f"{curve} from step {step}" for curve, step in not_finite.items())
        print(f"warning: {where}: NaN or inf in {curves}, marked on the charts (diverged there?)", file=sys.stderr)


def _labels_without_repeats(columns: list[str], series: Series) -> dict[str, str]:
    """{column: legend label}, a column whose points equal an earlier one's folded into its label (AdamW's two
    parameter groups share one learning rate: one line "lr-AdamW/pg1 = lr-AdamW/pg2")."""
    labels: dict[str, str] = {}
    for column in columns:
        same = next((k for k in labels if series[k] == series[column]), None)
        if same is None:
            labels[column] = column
        else:
            labels[same] += f" = {column}"
    return labels


def _finish(ax, ylabel: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.grid(alpha=0.3)


@contextmanager
def _fonts_for_any_script() -> Iterator[None]:
    """Draw with matplotlib's default font first and the Chinese, Japanese or Korean fonts installed here after it,
    which matplotlib (3.6+) takes a character from when the first lacks it: a sweep over Chinese prompts was
    labelled with empty boxes. Where no installed font has a label's characters, matplotlib's warning per
    character becomes one line saying what to install."""
    from matplotlib import font_manager, rc_context

    installed = {font.name for font in font_manager.fontManager.ttflist}
    families = ["sans-serif", *(name for name in CJK_FONTS if name in installed)]
    with rc_context({"font.family": families}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = [w for w in caught if re.match(r"Glyph \d+ .* missing from font", str(w.message))]
    for w in caught:
        if w not in missing:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if missing:
        print("warning: no installed font has some characters of the labels, drawn as boxes: install a font for "
              "them (Chinese: fonts-noto-cjk on Debian/Ubuntu), then delete ~/.cache/matplotlib, where matplotlib "
              "keeps its list of fonts", file=sys.stderr)


def _figure_class() -> type:
    """matplotlib's Figure, or a one-line error if matplotlib is missing. Used directly rather than through pyplot:
    no global state and no window, whatever backend is configured; savefig(format="png") draws it with Agg."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("lfpl-plot needs matplotlib: pip install 'llmfoundry-pl[plot]'") from None
    return Figure


def _save(fig, path: Path) -> Path:
    """Write the PNG whole or not at all (a temp file, then a rename): a half-written image never appears."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


if __name__ == "__main__":
    main()
