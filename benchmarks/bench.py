"""Preset grids (``benchmarks/configs/*.yaml``): run every cell, write records, a CSV and a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.run import Paths, RunConfig
from benchmarks.sweep import CONFIG_DIR, SWEEP_KEYS, expand, load_sweep, run_sweep

__all__ = ["CONFIG_DIR", "GRID_KEYS", "cells", "load_preset", "markdown_table", "run_preset"]

GRID_KEYS = set(SWEEP_KEYS)


def load_preset(preset: str) -> dict[str, Any]:
    """A preset name (``benchmarks/configs/<name>.yaml``) or a YAML path, validated (see ``benchmarks.sweep``)."""
    return load_sweep(preset)


def cells(grid: dict[str, Any]) -> list[RunConfig]:
    """Every cell of a grid, victim-major: every defence of one victim runs before the next victim is trained."""
    return expand(grid)


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


def run_preset(preset: str | dict[str, Any], out: Path, paths: Paths) -> pd.DataFrame:
    """``nftbench bench``: the preset (a name, a path or a loaded grid) as a sweep on the local in-process executor
    (resumable, see sweep.py)."""
    return run_sweep(preset, out, paths, executor="local", workers=1).df
