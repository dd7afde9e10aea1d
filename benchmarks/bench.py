"""Preset grids (``benchmarks/configs/*.yaml``): run every cell, write records, a CSV and a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.grid import CONFIG_DIR, SWEEP_KEYS, expand, load_sweep
from benchmarks.run import Paths, RunConfig
from benchmarks.sweep import run_sweep

__all__ = ["CONFIG_DIR", "GRID_KEYS", "cells", "load_preset", "run_preset"]

GRID_KEYS = set(SWEEP_KEYS)


def load_preset(preset: str) -> dict[str, Any]:
    """A preset name (``benchmarks/configs/<name>.yaml``) or a YAML path, validated (see ``benchmarks.grid``)."""
    return load_sweep(preset)


def cells(grid: dict[str, Any]) -> list[RunConfig]:
    """Every cell of a grid, victim-major: every defence of one victim runs before the next victim is trained."""
    return expand(grid)


def run_preset(preset: str | dict[str, Any], out: Path, paths: Paths) -> pd.DataFrame:
    """``nftbench bench``: the preset (a name, a path or a loaded grid) as a sweep on the local in-process executor
    (resumable, see ``benchmarks.sweep``)."""
    return run_sweep(preset, out, paths, executor="local", workers=1).df
