"""A Hydra callback that ends a multirun with a table: each job's overrides → its final figures.

It reads the ``final_metrics.json`` every job writes into its own directory (``write_final_metrics``), rather than
keeping results in memory, so it works with any launcher (jobs in other processes included) and shows failed jobs
as such. lfpl-train's jobs write held-out metrics and speed; lfpl-bench's, in a multirun, its JSON line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llmfoundry_pl.config import ConfigError, one_line
from llmfoundry_pl.files import atomic_write_bytes

RESULTS = "final_metrics.json"
UNFINISHED = "(failed or unfinished)"
UNREADABLE = "(record unreadable)"
# A job's status by the key its results carry when it ended on the user's side (cli.common.fail_sweep_job_alone)
FAILED = {"diverged": "(diverged)", "error": "(failed)"}
# Touched when a sweep starts. A sweep into a folder an earlier one used (a fixed hydra.sweep.dir, as the recipes
# have) finds that sweep's jobs there too: only files newer than this are this sweep's.
STARTED = ".sweep_started"


def write_final_metrics(output_dir: Path, metrics: dict[str, Any], **extra: Any) -> None:
    """Write a job's figures where the summary looks for them, with the overrides that set the job apart. A figure
    that is not finite (a diverged or failed job's val/loss) is written null: JSON has no NaN, and Python's NaN
    made a file that JavaScript's JSON.parse and strict parsers refuse; the record's ``diverged`` or ``error`` says
    why."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = _finite_or_null({"overrides": overrides, "metrics": metrics, **extra})
    atomic_write_bytes(Path(output_dir) / RESULTS, json.dumps(record, indent=2, allow_nan=False).encode())


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def fresh_files(sweep_dir: Path) -> Callable[[Path], bool]:
    """Whether a file under ``sweep_dir`` is the latest sweep's: newer than its :data:`STARTED` (any file, where no
    sweep touched one). A job that failed early in a reused folder leaves the earlier sweep's files in place."""
    started = sweep_dir / STARTED
    since = started.stat().st_mtime if started.is_file() else 0.0
    return lambda path: path.is_file() and path.stat().st_mtime >= since


def collect_rows(sweep_dir: Path, unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per job directory (numbered by Hydra) of the latest sweep under ``sweep_dir``, in job order: its
    overrides (a list, as Hydra keeps them: a value may hold spaces) and figures (and ``status`` "(failed)" or
    "(diverged)" for a job that ended so), or for a job without results its overrides (from the config Hydra saved,
    ``.hydra/``; lfpl-bench saves none) and ``status`` :data:`UNFINISHED`.

    A job's record that is not one is a ConfigError naming it; or, given ``unreadable`` (lfpl-plot, which draws
    from the CSV logs), its message is appended there and the job's row has no figures: the overrides from
    ``.hydra/`` where they can be read, and ``status`` :data:`UNREADABLE`."""
    fresh = fresh_files(sweep_dir)
    rows = []
    # A job's folder is hydra.sweep.subdir below the sweep's: the job number by default, deeper for a subdir such as
    # lr${optim.lr}/s${seed} (the summary found no job there: a TypeError instead of a table)
    job_dirs = {p.parents[1] for p in sweep_dir.rglob(".hydra/overrides.yaml") if fresh(p)}
    job_dirs |= {p.parent for p in sweep_dir.rglob(RESULTS) if fresh(p)}
    job_dirs.discard(sweep_dir)  # a single run's folder is not a sweep of itself
    for job_dir in sorted(job_dirs, key=lambda d: (len(str(d)), str(d))):
        name = job_dir.relative_to(sweep_dir).as_posix()
        saved = job_dir / ".hydra" / "overrides.yaml"
        read = job_dir / RESULTS if fresh(job_dir / RESULTS) else saved
        try:
            rows.append(_job_row(name, read))
        except ConfigError as e:
            if unreadable is None:
                raise
            unreadable.append(str(e))
            try:
                overrides = _job_row(name, saved)["overrides"] if read != saved and fresh(saved) else []
            except ConfigError:
                overrides = []
            rows.append({"job": name, "overrides": overrides, "status": UNREADABLE})
    return rows


def _job_row(name: str, read: Path) -> dict[str, Any]:
    """:func:`collect_rows`'s row for the job ``name`` from its results or, with none, the overrides Hydra saved."""
    try:
        if read.name == RESULTS:
            record = json.loads(read.read_text())
            failed = [text for key, text in FAILED.items() if key in record]
            # null is how write_final_metrics keeps a figure that is not finite: nan in the table, as it was
            metrics = {k: math.nan if v is None else v for k, v in dict(record["metrics"]).items()}
            return {"job": name, "overrides": list(record["overrides"]), **metrics,
                    **({"status": failed[0]} if failed else {})}
        return {"job": name, "overrides": list(OmegaConf.load(read)), "status": UNFINISHED}
    except Exception as e:  # cut short, edited, another program's: JSON's, YAML's or a KeyError's traceback
        raise ConfigError(f"{read} is not a record a sweep's job wrote ({type(e).__name__}: "
                          f"{one_line(e, 120)}); remove that job's folder, or fix the file") from None


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every figure the jobs report, in the order they first appear: held-out metrics, then speed (lfpl-train's
    pretraining, fine-tuning and DPO jobs each report their own)."""
    columns = dict.fromkeys(k for r in rows for k in r if k not in ("job", "overrides", "status"))
    return list(columns)


def split_overrides(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The overrides shared by every job, and each row's others: what the sweep varied ("-" if nothing; an
    unfinished job's marked so)."""
    jobs = [r["overrides"] for r in rows]
    common = [o for o in jobs[0] if all(o in j for j in jobs)] if jobs else []
    varied = []
    for r, j in zip(rows, jobs, strict=True):
        own = " ".join(o for o in j if o not in common) or "-"
        varied.append(f"{own} {r['status']}" if r.get("status") else own)
    return common, varied


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table, readable in a terminal and rendered by any Markdown viewer. Overrides shared by every job
    are listed once above it, so the column shows what the sweep varied."""
    common, varied = split_overrides(rows)
    header = ["job", "overrides", *columns]
    cells = [[str(r.get("job", "")), v] + [_fmt(c, r.get(c)) for c in columns]
             for r, v in zip(rows, varied, strict=True)]
    widths = [max(_width(h), *(_width(row[i]) for row in cells)) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v + " " * (w - _width(v)) for v, w in zip(values, widths, strict=True)) \
        + " |"
    table = [line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)]
    return "\n".join(([f"common to all jobs: {' '.join(common)}", ""] if common else []) + table)


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: Chinese, Japanese and Korean characters take two (the table's columns
    slid apart where a value held them)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fmt(column: str, value: Any) -> str:
    """A cell: bytes in MiB (the CSV keeps them exact), large numbers with thousands separators, others to 4 places."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if column.endswith("_bytes"):
        return f"{value / 2**20:,.0f} MiB"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"


class SweepSummary(Callback):
    """Prints the table at the end of a multirun and writes ``summary.md`` and ``summary.csv`` beside the jobs.

    ``columns``: which of the jobs' figures to show (lfpl-bench's config names them:
    ``hydra.callbacks.sweep_summary``); None: every figure they report (:func:`metric_columns`)."""

    def __init__(self, columns: Sequence[str] | None = None) -> None:
        self.columns = None if columns is None else list(columns)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        (Path(config.hydra.sweep.dir) / STARTED).touch()  # the folder: CreateOutputFolder, the callback before

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            rows = collect_rows(sweep_dir)
        except ConfigError as e:  # Hydra's callbacks run outside the commands' one-line errors
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if not rows:
            print(f"\nsweep summary: no job of this sweep left results under {sweep_dir}", flush=True)
            return
        columns = self.columns if self.columns is not None else metric_columns(rows)
        table = format_table(rows, columns)
        atomic_write_bytes(sweep_dir / "summary.md", (table + "\n").encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["job", "overrides", "status", *columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "overrides": " ".join(r["overrides"])} for r in rows)
        atomic_write_bytes(sweep_dir / "summary.csv", buffer.getvalue().encode())
        print(f"\nsweep summary ({sweep_dir}/summary.md):\n{table}", flush=True)
        # A job that could not run (its settings, the device's memory) is the user's to fix, as in a single run, so
        # the sweep ends with a single run's exit status: all jobs failing exited 0, and scripts went on. A job
        # that diverged ran: its nan is a result of the sweep (rates too high), not a failure of it.
        failed = [r["job"] for r in rows if r.get("status") == FAILED["error"]]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed (job {', '.join(failed)}), each with its line "
                  "above", file=sys.stderr, flush=True)
            raise SystemExit(2)
