"""Preset grids (``benchmarks/configs/*.yaml``): run every cell, write records, a CSV and a markdown table."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from benchmarks.checkpoint import atomic_write_text
from benchmarks.records import CSV_COLUMNS
from benchmarks.run import Paths, RunConfig, run_once

CONFIG_DIR = Path(__file__).parent / "configs"
GRID_KEYS = {"name", "task", "scale", "model", "datasets", "attacks", "defenses", "budgets", "seeds",
             "attack_params", "defense_params", "description"}


def load_preset(preset: str) -> dict[str, Any]:
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"preset {preset!r} not found ({path}); presets: {', '.join(names)}")
    grid = yaml.safe_load(path.read_text())
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(GRID_KEYS)}")
    return grid


def cells(grid: dict[str, Any]) -> list[RunConfig]:
    out = []  # victim-major order: every defence of one victim runs before the next victim is trained
    for dataset, attack, seed, budget, defense in itertools.product(
        grid["datasets"], grid["attacks"], grid["seeds"], grid["budgets"], grid["defenses"]
    ):
        out.append(RunConfig(
            task=grid.get("task", "image"), dataset=dataset, model=grid.get("model"), scale=grid.get("scale", "quick"),
            attack=None if attack == "none" else attack,
            attack_params=dict(grid.get("attack_params", {}).get(attack, {})),
            defense=defense, defense_params=dict(grid.get("defense_params", {}).get(defense, {})),
            val_frac=budget.get("val_frac"), per_class=budget.get("per_class"), seed=seed,
        ))
    return out


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


def run_preset(preset: str, out: Path, paths: Paths) -> pd.DataFrame:
    grid = load_preset(preset)
    todo = cells(grid)
    csv = out / "results.csv"
    if csv.is_file():
        csv.unlink()  # rebuilt from this grid's records; finished cells are read back, not rerun
    for i, cfg in enumerate(todo, 1):
        budget = cfg.budget().describe()
        print(f"[{i}/{len(todo)}] {cfg.dataset} {cfg.attack} {cfg.defense} clean={budget} seed={cfg.seed}", flush=True)
        run_once(cfg, paths, results_csv=csv, records_dir=out / "records", skip_done=True)
    df = pd.read_csv(csv, keep_default_na=True)[CSV_COLUMNS]
    table = markdown_table(df)
    atomic_write_text(out / "table.md", f"# {grid.get('name', preset)}\n\n{grid.get('description', '')}\n\n{table}")
    print(table)
    return df
