"""A Hydra callback that ends a multirun with a table: each job's overrides → its final figures.

It reads the ``final_metrics.json`` every job writes into its own directory (``write_final_metrics``), rather than
keeping results in memory, so it works with any launcher (jobs in other processes included) and shows failed jobs
as such. lfpl-train's jobs write held-out metrics and speed; lfpl-bench's, in a multirun, its JSON line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llmfoundry_pl.tokenizer import atomic_write_bytes

# lfpl-train's (lfpl-bench names its own): tokens/s wall-clock, then in the training steps alone (see _step_speed in
# cli/train.py), and the steps' MFU.
COLUMNS = ("val/loss", "val/ppl", "val/bpb", "train_tokens_per_s", "step_tokens_per_s", "mfu")
RESULTS = "final_metrics.json"
UNFINISHED = "(failed or unfinished)"


def write_final_metrics(output_dir: Path, metrics: dict[str, Any], **extra: Any) -> None:
    """Write a job's figures where the summary looks for them, with the overrides that set the job apart."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "metrics": metrics, **extra}
    atomic_write_bytes(Path(output_dir) / RESULTS, json.dumps(record, indent=2).encode())


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (numbered by Hydra) under ``sweep_dir``, in job order. A job's directory holds the
    config Hydra saved (``.hydra/``; lfpl-bench saves none) or the job's results."""
    rows = []
    job_dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir() or (d / RESULTS).is_file()]
    for job_dir in sorted(job_dirs, key=lambda d: (len(d.name), d.name)):
        metrics_file = job_dir / RESULTS
        if metrics_file.is_file():
            record = json.loads(metrics_file.read_text())
            rows.append({"job": job_dir.name, "overrides": " ".join(record["overrides"]), **record["metrics"]})
        else:
            rows.append({"job": job_dir.name, "overrides": UNFINISHED})
    return rows


def split_overrides(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The overrides shared by every finished job, and each row's others: what the sweep varied ("-" if nothing)."""
    finished = [r["overrides"].split() for r in rows if r["overrides"] != UNFINISHED]
    common = [o for o in finished[0] if all(o in f for f in finished)] if finished else []
    varied = [" ".join(o for o in r.get("overrides", "").split() if o not in common) or "-" for r in rows]
    return common, varied


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table, readable in a terminal and rendered by any Markdown viewer. Overrides shared by every job
    are listed once above it, so the column shows what the sweep varied."""
    common, varied = split_overrides(rows)
    header = ["job", "overrides", *columns]
    cells = [[str(r.get("job", "")), v] + [_fmt(c, r.get(c)) for c in columns]
             for r, v in zip(rows, varied, strict=True)]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    table = [line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)]
    return "\n".join(([f"common to all jobs: {' '.join(common)}", ""] if common else []) + table)


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

    ``columns``: which of the jobs' figures to show (the config sets them: ``hydra.callbacks.sweep_summary``)."""

    def __init__(self, columns: Sequence[str] = COLUMNS) -> None:
        self.columns = list(columns)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_rows(sweep_dir)
        table = format_table(rows, self.columns)
        atomic_write_bytes(sweep_dir / "summary.md", (table + "\n").encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["job", "overrides", *self.columns], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(sweep_dir / "summary.csv", buffer.getvalue().encode())
        print(f"\nsweep summary ({sweep_dir}/summary.md):\n{table}", flush=True)
