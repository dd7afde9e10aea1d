"""Run records: labels, DER, atomic JSON records and results CSV rows (hashes: ``common.hashing``; versions and
device: ``common.environment``)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from common.checkpoint import atomic_write_text
from common.fileio import file_lock


def params_label(name: str, params: dict[str, Any]) -> str:
    """A name with the options that set it apart, as sweeps, leaderboards and perf label cells:
    ``nft[mixup=False]``, ``preact-resnet18[width=0.25]``; the bare name without options."""
    if not params:
        return name
    return name + "[" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + "]"


def der(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """Defense Effectiveness Rating (BackdoorBench), with the accuracy drop subtracted as its paper means:
    DER = [max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1] / 2, in [0, 1]."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    p = Path(path)
    atomic_write_text(p, json.dumps(record, indent=1, default=str))
    return p


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


CSV_COLUMNS = [
    "run_id", "status", "task", "dataset", "model", "attack", "defense", "budget", "seed",
    "clean_acc_before", "asr_before", "ra_before", "clean_acc_after", "asr_after", "ra_after", "der",
    "defense_time_s", "forward_samples", "backward_samples", "precision", "device", "error",
]


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    cfg, before, after = record["config"], record.get("before") or {}, record.get("after") or {}
    info = record.get("defense_info") or {}
    return {
        "run_id": record["run_id"], "status": record["status"], "task": cfg["task"]["task"],
        "dataset": cfg["task"]["dataset"], "model": cfg["task"]["model"],
        "attack": (cfg.get("attack") or {}).get("name", "none"), "defense": cfg["defense"],
        "budget": cfg["budget"], "seed": cfg["seed"],
        "clean_acc_before": before.get("clean_acc"), "asr_before": before.get("asr"), "ra_before": before.get("ra"),
        "clean_acc_after": after.get("clean_acc"), "asr_after": after.get("asr"), "ra_after": after.get("ra"),
        "der": record.get("der"), "defense_time_s": info.get("wall_time_s"),
        "forward_samples": info.get("forward_samples"), "backward_samples": info.get("backward_samples"),
        "precision": record.get("precision"), "device": record.get("device"), "error": record.get("error"),
    }


def labelled_row(record: dict[str, Any]) -> dict[str, Any]:
    """The CSV row with the defence labelled by its options (``nft[steps=100]``), as results CSVs and tables show
    it; ``record_row`` keeps the bare name (the leaderboard labels from the config itself)."""
    row = record_row(record)
    row["defense"] = params_label(row["defense"], record["config"].get("defense_params") or {})
    return row


class ResultsFileError(ValueError):
    """A results CSV that is not nftbench's: it is never overwritten."""


def read_results_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of an nftbench results CSV (none if it is missing or empty). Any other file (its header is not
    nftbench's columns, or an earlier subset of them) is refused, so a results path never destroys a user's file."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return []
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if "run_id" not in header or not set(header) <= set(CSV_COLUMNS):
                raise ResultsFileError(f"{p} is not an nftbench results CSV (its columns are {header[:5]}...); it was "
                                       "left untouched: give --results a new file or an nftbench results CSV")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ResultsFileError(f"{p} is not an nftbench results CSV ({e}); it was left untouched: give --results a "
                               "new file or an nftbench results CSV") from None


def append_csv_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Add (or replace, by run_id) one row. The read-modify-write holds a lock (``.<name>.lock`` beside the file), so
    concurrent writers never drop each other's rows, and the file is replaced atomically, so it is never
    half-written. A file that is not an nftbench results CSV is refused (:func:`read_results_csv`)."""
    p = Path(path)
    with file_lock(p.with_name(f".{p.name}.lock")):
        rows = [r for r in read_results_csv(p) if r.get("run_id") != row["run_id"]]
        rows.append({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(p, buf.getvalue())
