"""A Hydra callback that ends a multirun with a table: each job's overrides → its final held-out metrics.

It reads the ``final_metrics.json`` every job writes into its own directory, rather than keeping results in
memory, so it works with any launcher (jobs in other processes included) and shows failed jobs as such.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llmfoundry_pl.tokenizer import atomic_write_bytes

COLUMNS = ("val/loss", "val/ppl", "val/bpb", "train_tokens_per_s")


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (numbered by Hydra) under ``sweep_dir``, in job order."""
    rows = []
    job_dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    for job_dir in sorted(job_dirs, key=lambda d: (len(d.name), d.name)):
        metrics_file = job_dir / "final_metrics.json"
        if metrics_file.is_file():
            record = json.loads(metrics_file.read_text())
            rows.append({"job": job_dir.name, "overrides": " ".join(record["overrides"]), **record["metrics"]})
        else:
            rows.append({"job": job_dir.name, "overrides": "(failed or unfinished)"})
    return rows


def split_overrides(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The overrides shared by every finished job, and each row's others: what the sweep varied ("-" if nothing)."""
    finished = [r["overrides"].split() for r in rows if "val/loss" in r]
    common = [o for o in finished[0] if all(o in f for f in finished)] if finished else []
    varied = [" ".join(o for o in r.get("overrides", "").split() if o not in common) or "-" for r in rows]
    return common, varied


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, readable in a terminal and rendered by any Markdown viewer. Overrides shared by every job
    are listed once above it, so the column shows what the sweep varied."""
    common, varied = split_overrides(rows)
    header = ["job", "overrides", *COLUMNS]
    cells = [[str(r.get("job", "")), v] + [_fmt(r.get(c)) for c in COLUMNS] for r, v in zip(rows, varied, strict=True)]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"
    table = [line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)]
    return "\n".join(([f"common to all jobs: {' '.join(common)}", ""] if common else []) + table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"


class SweepSummary(Callback):
    """Prints the table at the end of a multirun and writes ``summary.md`` and ``summary.csv`` beside the jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_rows(sweep_dir)
        table = format_table(rows)
        atomic_write_bytes(sweep_dir / "summary.md", (table + "\n").encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["job", "overrides", *COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(sweep_dir / "summary.csv", buffer.getvalue().encode())
        print(f"\nsweep summary ({sweep_dir}/summary.md):\n{table}", flush=True)
