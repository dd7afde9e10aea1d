"""What a sweep writes besides its records: ``<out>/results.csv``, rebuilt from the records (atomically, one row per
record of the folder, errors included: the grid's cells first), and ``<out>/table.md``, the grid's cells as a markdown
table with each failed cell's error and whether a rerun may fix it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.plan import Cell, Plan
from benchmarks.records import CSV_COLUMNS, labelled_row, write_record
from common.checkpoint import atomic_write_text
from common.fileio import file_lock


class Collector:
    """Receives finished records (in the driver) and keeps ``results.csv`` rebuilt from the records."""

    def __init__(self, plan: Plan, out: Path,
                 on_record: Callable[[Cell, dict[str, Any]], None] | None = None) -> None:
        self.plan, self.out, self.on_record = plan, out, on_record

    def __call__(self, cell: Cell, record: dict[str, Any]) -> None:
        path = self.out / "records" / f"{cell.run_id}.json"
        try:
            same = json.loads(path.read_text()) == json.loads(json.dumps(record, default=str))
        except (OSError, ValueError):
            same = False
        if not same:  # a worker on another node without a shared file system: write it here
            write_record(path, record)
        cell.status = "done" if record.get("status") == "ok" else "error"
        rebuild_csv(self.out, [c.run_id for c in self.plan.cells])
        if self.on_record:
            self.on_record(cell, record)


def rebuild_csv(out: Path, run_ids: list[str]) -> Path:
    """Write ``out/results.csv`` (atomically) from ``out/records/*.json``: one row per id of ``run_ids`` that has
    a record, in that order, then every other record of the folder (by start time), so sweeps sharing a folder
    (cifar10-quick and cifar10-quick-all) never drop each other's rows. Nothing else ever writes the CSV, so it
    cannot be half-written or duplicated."""

    def read(p: Path) -> dict[str, Any] | None:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    path = out / "results.csv"
    with file_lock(out / ".results.csv.lock"):  # sweeps sharing the folder: the last rebuild reads every record
        records = [read(out / "records" / f"{run_id}.json") for run_id in run_ids]
        listed = set(run_ids)
        others = [read(p) for p in sorted((out / "records").glob("*.json")) if p.stem not in listed]
        others = sorted((r for r in others if r and "run_id" in r), key=lambda r: str(r.get("started", "")))
        rows = [{k: ("" if v is None else v) for k, v in labelled_row(r).items()} for r in records + others if r]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return path


def clean_stale_temp_files(out: Path) -> None:
    """Remove ``.name.tmp<pid>`` files that a killed writer left behind (only those whose process is gone)."""
    for folder in (out, out / "records", out / "logs"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp*"):
            m = re.search(r"\.tmp(\d+)$", p.name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                p.unlink(missing_ok=True)
            except (PermissionError, OverflowError):
                pass


RETRYABLE = ("worker failed", "ray task failed", "OutOfMemoryError", "MemoryError", "RuntimeError", "OSError",
             "TimeoutError", "ConnectionError")


def retryable(error: str) -> bool:
    """Whether a failed cell's error may pass on a rerun (memory, a lost worker, the file system); the others
    (bad values, missing data, NaN losses) need the config or the data fixed first."""
    return error.startswith(RETRYABLE)


def markdown_table(df: pd.DataFrame) -> str:
    """One row per run: metrics in %, DER in %, defence wall time in seconds."""
    if df.empty:
        return "(no runs)\n"
    cols = ["dataset", "attack", "defense", "budget", "seed", "clean_acc_after", "asr_after", "ra_after", "der",
            "defense_time_s", "status"]
    head = "| dataset | attack | defence | clean data | seed | C-ACC | ASR | RA | DER | time (s) | status |"
    lines = [head, "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        def pct(v):
            return "-" if pd.isna(v) or v == "" else f"{100 * float(v):.2f}"

        t = "-" if pd.isna(r.defense_time_s) or r.defense_time_s == "" else f"{float(r.defense_time_s):.1f}"
        lines.append(f"| {r.dataset} | {r.attack} | {r.defense} | {r.budget} | {r.seed} | {pct(r.clean_acc_after)} | "
                     f"{pct(r.asr_after)} | {pct(r.ra_after)} | {pct(r.der)} | {t} | {r.status} |")
    return "\n".join(lines) + "\n"


def write_table(plan: Plan, out: Path) -> tuple[pd.DataFrame, str]:
    """Write ``out/table.md``: the grid's rows of ``results.csv`` as a table, then its failed cells, each marked
    [retry] or [fix] (:func:`retryable`). Returns those rows and the table."""
    df = pd.read_csv(out / "results.csv", keep_default_na=True)[CSV_COLUMNS]
    df = df[df.run_id.astype(str).isin({c.run_id for c in plan.cells})]  # this grid's cells; the CSV has them all
    table = markdown_table(df)
    failed = df[df.status != "ok"]
    if len(failed):
        table += ("\nFailed cells (details in logs/<run_id>.log; [retry]: rerunning the sweep retries it, [fix]: fix "
                  "what the error names first, rerunning alone fails the same way):\n\n")
        table += "".join(f"- `{r.run_id}` [{'retry' if retryable(str(r.error)) else 'fix'}] {r.dataset} {r.attack} "
                         f"{r.defense} {r.budget} seed {r.seed}: {r.error}\n" for r in failed.itertuples())
    atomic_write_text(out / "table.md", f"# {plan.name}\n\n{plan.description}\n\n{table}")
    return df, table
