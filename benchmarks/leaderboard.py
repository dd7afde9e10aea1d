"""Leaderboard: every run record under a results folder -> one CSV per task/dataset, LEADERBOARD.md, plots.

``nftbench leaderboard RESULTS_DIR [--out results]`` reads ``RESULTS_DIR/**/records/*.json`` (or the JSON files of a
records folder) and writes:

- ``<out>/<task>/<dataset>.csv``: one row per (model, scale, attack, defence, clean budget), means and sample
  standard deviations over seeds of the metrics after the defence, the victim's metrics before it (mean), the
  defence's wall time and its ratio to NFT's on the same victim, budget and seed (``time_vs_nft``), and the number
  of failed runs (status other than ``ok``) of that cell;
- ``<out>/LEADERBOARD.md``: one markdown table per task/dataset (accuracies in %), with the command that
  regenerates it at the top; failed runs are counted in their row and listed under the table, never dropped;
- ``<out>/plots/<task>_<dataset>_{asr_vs_acc,runtime,nft_budget}.png`` (matplotlib, Agg canvas).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.checkpoint import atomic_write_text
from benchmarks.records import params_label, record_row

GROUP_KEYS = ["task", "dataset", "model", "scale", "attack", "defense", "budget"]
METRICS = [  # (column of results.csv, prefix of the leaderboard's mean/std columns)
    ("clean_acc_after", "clean_acc"), ("asr_after", "asr"), ("ra_after", "ra"), ("der", "der"),
    ("defense_time_s", "defense_time_s"), ("time_vs_nft", "time_vs_nft"),
]
VICTIM_KEYS = ["task", "dataset", "model", "scale", "attack", "budget", "seed"]
BEFORE = ["clean_acc_before", "asr_before", "ra_before"]
LEADERBOARD_COLUMNS = (
    GROUP_KEYS + ["clean_samples", "n_seeds", "seeds", "failed"] + BEFORE
    + [f"{p}_{s}" for _, p in METRICS for s in ("mean", "std")] + ["defense_name", "errors"]
)
PLOTS = ("asr_vs_acc", "runtime", "nft_budget")


# --------------------------------------------------------------------------------------------------------------
# Reading records.


def find_records(roots: Iterable[str | Path]) -> list[Path]:
    """``root/**/records/*.json`` of each root; for a root without such files (a records folder), its ``*.json``."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            nested = {p.resolve() for p in root.glob("**/records/*.json")}
            found.update(nested or {p.resolve() for p in root.glob("*.json")})
        else:
            raise FileNotFoundError(f"{root}: no such results folder")
    return sorted(found)


def _rank(record: dict[str, Any]) -> tuple[bool, str]:
    return record.get("status") == "ok", str(record.get("finished") or "")


def load_records(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Records by run id (a run found twice keeps its ``ok``, then its newest copy) and a note per file skipped."""
    by_id: dict[str, dict[str, Any]] = {}
    notes = []
    for p in paths:
        try:
            record = json.loads(Path(p).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{p}: unreadable ({type(e).__name__}: {e})")
            continue
        if not isinstance(record, dict) or not {"run_id", "status", "config"} <= set(record):
            notes.append(f"{p}: not a run record (no run_id/status/config)")
            continue
        record["_path"] = str(p)
        prev = by_id.get(record["run_id"])
        if prev is None or _rank(record) > _rank(prev):
            by_id[record["run_id"]] = record
    return list(by_id.values()), notes


def records_frame(records: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """One row per record: the results-CSV row plus scale, clean sample count, and labels that keep apart
    runs of the same attack or defence with other options (e.g. ``nft[mixup=False]``)."""
    rows, notes = [], []
    for r in records:
        try:
            row = record_row(r)
            cfg = r["config"]
            row["scale"] = cfg["task"].get("scale") or ""
        except (KeyError, TypeError, AttributeError) as e:
            notes.append(f"{r.get('_path', r.get('run_id'))}: malformed record ({type(e).__name__}: {e})")
            continue
        attack_cfg = {k: v for k, v in (cfg.get("attack") or {}).items() if k not in ("name", "seed")}
        row["attack_config"] = json.dumps(attack_cfg, sort_keys=True, default=str)
        row["defense_name"] = row["defense"]
        row["defense"] = params_label(row["defense"], cfg.get("defense_params") or {})
        samples = r.get("clean_samples", (r.get("defense_info") or {}).get("clean_samples"))
        row["clean_samples"] = samples
        row["model"] = params_label(row["model"] or "", cfg["task"].get("model_kwargs") or {})
        row["path"] = r.get("_path", "")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df, notes
    for col in BEFORE + [c for c, _ in METRICS if c != "time_vs_nft"] + ["clean_samples", "seed"]:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["budget"] = df["budget"].astype(str)
    df["attack"] = _attack_labels(df)
    # each run's defence time over NFT's (paper defaults) on the same victim, clean budget and seed: a ratio
    # measured side by side, where absolute CPU times mean little
    nft = df[(df["defense"] == "nft") & (df["status"] == "ok")].groupby(VICTIM_KEYS, dropna=False)
    nft_time = nft["defense_time_s"].mean().rename("nft_time_s")
    df = df.join(nft_time, on=VICTIM_KEYS)
    df["time_vs_nft"] = df["defense_time_s"] / df["nft_time_s"]
    return df.drop(columns="nft_time_s"), notes


def _attack_labels(df: pd.DataFrame) -> pd.Series:
    """The attack's name, plus the options that differ between runs of that attack on the same task/dataset."""
    labels = df["attack"].copy()
    for _, g in df.groupby(["task", "dataset", "attack"], sort=False):
        configs = {c: json.loads(c) for c in g["attack_config"].unique()}
        if len(configs) < 2:
            continue
        keys = sorted({k for c in configs.values() for k in c})
        # a key varies when two configs that have it disagree (a failed cell's unresolved config may lack keys)
        varying = [k for k in keys if len({json.dumps(c[k], default=str) for c in configs.values() if k in c}) > 1]
        for idx, c in zip(g.index, g["attack_config"], strict=True):
            labels[idx] = params_label(df.at[idx, "attack"], {k: configs[c][k] for k in varying if k in configs[c]})
    return labels


# --------------------------------------------------------------------------------------------------------------
# Aggregation.


def _std(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.std(ddof=1)) if len(v) >= 2 else float("nan")


def _defense_order(name: str) -> tuple[int, str]:
    return ({"none": 0, "nft": 1}.get(name, 2), name)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, dataset, model, scale, attack, defence, budget): means/stds over the ``ok`` seeds, the
    victim's before-metrics (mean over every run of the cell) and the count of failed runs."""
    if df.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    out = []
    for key, g in df.groupby(GROUP_KEYS, sort=False, dropna=False):
        ok = g[g["status"] == "ok"]
        bad = g[g["status"] != "ok"]
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        samples = g["clean_samples"].dropna()
        row["clean_samples"] = int(samples.max()) if len(samples) else np.nan
        row["n_seeds"] = int(ok["seed"].nunique())
        row["seeds"] = " ".join(str(int(s)) for s in sorted(ok["seed"].dropna().unique()))
        row["failed"] = len(bad)
        for col in BEFORE:
            row[col] = g[col].mean()
        for col, prefix in METRICS:
            row[f"{prefix}_mean"] = ok[col].mean() if len(ok) else np.nan
            row[f"{prefix}_std"] = _std(ok[col])
        row["defense_name"] = g["defense_name"].iloc[0]
        errors = [str(e) for e in bad["error"].dropna().unique() if str(e)]
        row["errors"] = " | ".join(e[:200] for e in errors) or ("" if bad.empty else "(no error message)")
        out.append(row)
    agg = pd.DataFrame(out, columns=LEADERBOARD_COLUMNS)
    order = agg.assign(
        _d=agg["defense"].map(lambda d: _defense_order(str(d))),
        _n=-agg["clean_samples"].fillna(-1),
        _a=agg["attack"].map(lambda a: (a == "none", a)),
    ).sort_values(["task", "dataset", "model", "scale", "_a", "_n", "budget", "_d"])
    return order[LEADERBOARD_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Markdown.


def _pct(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.2f}" if pd.isna(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _secs(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "-"
    def fmt(v: float) -> str:
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 0.01 or v == 0 \
            else f"{v:.1e}"

    return fmt(mean) if pd.isna(std) else f"{fmt(mean)} ± {fmt(std)}"


def markdown_section(task: str, dataset: str, agg: pd.DataFrame, failed: pd.DataFrame,
                     plots: dict[str, str]) -> str:
    lines = [f"## {task} / {dataset}", ""]
    head = ("| model | scale | attack | clean data | defence | seeds | C-ACC before | ASR before | C-ACC | ASR | RA "
            "| DER | time (s) | x NFT | failed |")
    lines += [head, "|" + "---|" * 15]
    for _, r in agg.iterrows():
        clean = r["budget"] + ("" if pd.isna(r["clean_samples"]) else f" ({int(r['clean_samples'])})")
        runs = r["n_seeds"] + r["failed"]
        failed_cell = "0" if r["failed"] == 0 else f"**{r['failed']} of {runs} FAILED**"
        if r["n_seeds"] == 0:
            metrics = ["**FAILED**"] * 6
        else:
            metrics = [_pct(r[f"{m}_mean"], r[f"{m}_std"]) for m in ("clean_acc", "asr", "ra", "der")]
            metrics.append(_secs(r["defense_time_s_mean"], r["defense_time_s_std"]))
            ratio = r["time_vs_nft_mean"]
            metrics.append("-" if pd.isna(ratio) or r["defense_name"] == "none" else f"{ratio:.2f}")
        before = [_pct(r["clean_acc_before"], np.nan), _pct(r["asr_before"], np.nan)]
        cells = [r["model"] or "-", r["scale"] or "-", r["attack"], clean, r["defense"], str(r["n_seeds"])]
        lines.append("| " + " | ".join([*cells, *before, *metrics, failed_cell]) + " |")
    if not failed.empty:
        lines += ["", f"Failed runs ({len(failed)}):", ""]
        for _, r in failed.iterrows():
            seed = "" if pd.isna(r["seed"]) else f" seed {int(r['seed'])}"
            err = str(r["error"]) if not pd.isna(r["error"]) and r["error"] != "" else "(no error message)"
            model = f" ({r['model']})" if r["model"] else ""
            lines.append(f"- {r['attack']} / {r['defense']} / {r['budget']}{seed}{model} "
                         f"[{r['status']}] run `{r['run_id']}`: {err[:300]}")
    if plots:
        lines += [""] + [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Plots (the object-oriented API on an Agg canvas: no pyplot, no global backend state).


def _figure(width: float = 6.4, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Lay the panels out inside ``rect`` (figure fractions; room left outside it for a figure legend), write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, format="png")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def plot_asr_vs_acc(agg: pd.DataFrame, title: str, path: Path) -> None:
    """ASR against clean accuracy after each defence: one marker per defence, one colour per attack; a point per
    (attack, defence, clean budget), mean ± std over seeds."""
    from matplotlib.lines import Line2D

    fig = _figure()
    ax = fig.add_subplot()
    pts = agg[(agg["n_seeds"] > 0) & agg["asr_mean"].notna() & agg["clean_acc_mean"].notna()]
    if pts.empty:
        _empty(ax, "no successful runs of a backdoored victim")
    else:
        defenses = sorted(pts["defense"].unique(), key=_defense_order)
        attacks = sorted(pts["attack"].unique())
        colours = {a: f"C{i % 10}" for i, a in enumerate(attacks)}
        markers = {d: MARKERS[i % len(MARKERS)] for i, d in enumerate(defenses)}
        for _, r in pts.iterrows():
            ax.errorbar(100 * r["clean_acc_mean"], 100 * r["asr_mean"],
                        xerr=None if pd.isna(r["clean_acc_std"]) else 100 * r["clean_acc_std"],
                        yerr=None if pd.isna(r["asr_std"]) else 100 * r["asr_std"],
                        fmt=markers[r["defense"]], color=colours[r["attack"]], markersize=7, alpha=0.85, capsize=2)
        handles = [Line2D([], [], ls="", marker=markers[d], color="0.3", label=d) for d in defenses]
        handles += [Line2D([], [], ls="", marker="s", color=colours[a], label=f"attack: {a}") for a in attacks]
        ax.legend(handles=handles, fontsize=7, loc="best")
        ax.set_ylim(-3, 103)
    ax.set_xlabel("clean accuracy after the defence (%)")
    ax.set_ylabel("attack success rate after the defence (%)")
    ax.set_title(f"{title}: ASR vs clean accuracy (mean ± std over seeds)", fontsize=9)
    _save(fig, path)


def plot_runtime(df: pd.DataFrame, title: str, path: Path) -> None:
    """Defence wall time per defence (mean ± std over every successful run: attacks, budgets, seeds);
    log scale when the means span a decade or more. The no-op ``none`` is left out."""
    fig = _figure()
    ax = fig.add_subplot()
    ok = df[(df["status"] == "ok") & df["defense_time_s"].notna() & (df["defense_name"] != "none")]
    if ok.empty:
        _empty(ax, "no timed defence runs")
    else:
        stats = ok.groupby("defense")["defense_time_s"].agg(["mean", "std", "count"])
        stats = stats.loc[sorted(stats.index, key=_defense_order)]
        x = np.arange(len(stats))
        ax.bar(x, stats["mean"], yerr=stats["std"].fillna(0), capsize=3, color=[f"C{i % 10}" for i in x])
        ax.set_xticks(x, [f"{d}\n(n={int(n)})" for d, n in zip(stats.index, stats["count"], strict=True)],
                      fontsize=7, rotation=30 if len(stats) > 5 else 0)
        positive = stats["mean"][stats["mean"] > 0]
        if len(positive) and positive.max() / positive.min() >= 10:
            ax.set_yscale("log")
        device = ok["device"].dropna().unique()
        if len(device) == 1:
            ax.set_xlabel(f"device: {device[0]}", fontsize=7)
    ax.set_ylabel("defence wall time (s)")
    ax.set_title(f"{title}: defence wall time (mean ± std over attacks, budgets, seeds)", fontsize=9)
    _save(fig, path)


def plot_nft_budget(agg: pd.DataFrame, title: str, path: Path) -> None:
    """NFT's ASR against its clean-data budget, one line per attack (and NFT variant/model when there are
    several); budgets sit on one axis by their number of clean samples (per-class and fractional alike)."""
    fig = _figure()
    ax = fig.add_subplot()
    nft = agg[(agg["defense_name"] == "nft") & (agg["n_seeds"] > 0) & agg["asr_mean"].notna()
              & agg["clean_samples"].notna()]
    if nft.empty:
        _empty(ax, "no successful NFT runs on a backdoored victim")
    else:
        many = {k: nft[k].nunique() > 1 for k in ("defense", "model", "scale")}
        for key, g in nft.groupby(["attack", "defense", "model", "scale"], sort=True):
            g = g.sort_values("clean_samples")
            label = " ".join(str(v) for v, k in zip(key, ["attack", "defense", "model", "scale"], strict=True)
                             if k == "attack" or many[k])
            ax.errorbar(g["clean_samples"], 100 * g["asr_mean"], yerr=100 * g["asr_std"].fillna(0), marker="o",
                        capsize=3, label=label)
        ticks = nft.groupby("clean_samples")["budget"].agg(lambda b: " / ".join(sorted(set(b))))
        if ticks.index.max() / max(ticks.index.min(), 1) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(list(ticks.index), [f"{int(n)}\n{b}" for n, b in ticks.items()], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7)
    ax.set_xlabel("clean samples given to NFT (budget)")
    ax.set_ylabel("attack success rate after NFT (%)")
    ax.set_title(f"{title}: NFT's ASR vs clean-data budget (mean ± std)", fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# The command.


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def build_leaderboard(roots: Sequence[str | Path], out: str | Path, command: str | None = None,
                      plots: bool = True) -> dict[str, Any]:
    """Aggregate every record under ``roots`` into ``out``; returns what was written and what was skipped."""
    out = Path(out)
    paths = find_records(roots)
    records, notes = load_records(paths)
    df, bad = records_frame(records)
    notes += bad
    command = command or "nftbench leaderboard " + " ".join(shlex.quote(str(r)) for r in roots) + \
        f" --out {shlex.quote(str(out))}"
    n_failed = 0 if df.empty else int((df["status"] != "ok").sum())
    md = [
        "# Leaderboard", "",
        f"Regenerate with: `{command}`", "",
        f"{len(df)} run records ({n_failed} failed) from {', '.join(f'`{r}`' for r in roots)}. One row per model, "
        "scale, attack, defence and clean budget (with its number of clean samples); accuracies in %, mean ± "
        "sample std over the seeds that finished (the mean alone for one seed); *before* is the victim before "
        "any defence; time is the defence's wall time in seconds, and *x NFT* the mean of its ratios to NFT's (paper "
        "defaults) on the same victim, clean budget and seed. A failed run (status not `ok`) is counted in "
        "its row's *failed* column and listed under its table; a row whose every run failed reads **FAILED**.",
        "",
    ]
    written: dict[str, Any] = {"csv": [], "plots": [], "records": len(df), "failed": n_failed, "notes": notes}
    if df.empty:
        md.append("(no run records found)\n")
    for (task, dataset), part in ([] if df.empty else df.groupby(["task", "dataset"], sort=True)):
        agg = aggregate(part)
        csv_path = out / _safe(task) / f"{_safe(dataset)}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(csv_path, agg.to_csv(index=False, float_format="%.6g"))
        written["csv"].append(csv_path)
        plot_links: dict[str, str] = {}
        if plots:
            title = f"{task}/{dataset}"
            stem = f"{_safe(task)}_{_safe(dataset)}"
            targets = {name: out / "plots" / f"{stem}_{name}.png" for name in PLOTS}
            plot_asr_vs_acc(agg, title, targets["asr_vs_acc"])
            plot_runtime(part, title, targets["runtime"])
            plot_nft_budget(agg, title, targets["nft_budget"])
            written["plots"] += list(targets.values())
            plot_links = {name: f"plots/{p.name}" for name, p in targets.items()}
        failed = part[part["status"] != "ok"].sort_values(["attack", "defense", "budget", "seed"])
        md.append(markdown_section(task, dataset, agg, failed, plot_links))
    if notes:
        md += ["## Files skipped", ""] + [f"- {n}" for n in notes] + [""]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "LEADERBOARD.md", "\n".join(md))
    written["markdown"] = out / "LEADERBOARD.md"
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS_DIR",
                   help="folder(s) searched for **/records/*.json, or a records folder")
    p.add_argument("--out", default="results", help="where <task>/<dataset>.csv, LEADERBOARD.md and plots/ go")
    p.add_argument("--no-plots", action="store_true", help="write the CSVs and the markdown only")


def run(args: argparse.Namespace) -> dict[str, Any]:
    command = "nftbench leaderboard " + " ".join(shlex.quote(str(r)) for r in args.results) + \
        f" --out {shlex.quote(str(args.out))}" + (" --no-plots" if args.no_plots else "")
    written = build_leaderboard(args.results, args.out, command=command, plots=not args.no_plots)
    for note in written["notes"]:
        print(f"skipped: {note}", file=sys.stderr)
    print(f"{written['records']} records ({written['failed']} failed) -> {written['markdown']}")
    for p in written["csv"] + written["plots"]:
        print(f"  {p}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nftbench leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()

