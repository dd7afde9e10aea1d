"""Leaderboard: every run record under a results folder -> one CSV per task/dataset, LEADERBOARD.md, plots.

``nftbench leaderboard RESULTS_DIR [--out results]`` reads ``RESULTS_DIR/**/records/*.json`` (or the JSON files of a
records folder) and writes:

- ``<out>/<task>/<dataset>.csv``: one row per (model, scale, attack, defence, clean budget), means and sample
  standard deviations over seeds of the metrics after the defence, the victim's metrics before it (mean), the
  defence's wall time and its ratio to NFT's on the same victim, budget and seed (``time_vs_nft``; its median in
  ``time_vs_nft_median``, against the NFT run named in ``nft_reference``), and the number of failed runs (status
  other than ``ok``) of that cell;
- ``<out>/LEADERBOARD.md``: one markdown table per task/dataset (accuracies in %), with the command that
  regenerates it at the top; failed runs are counted in their row and listed under the table, never dropped;
- ``<out>/plots/<task>_<dataset>_{asr_vs_acc,runtime,nft_budget}.png`` (``benchmarks.leaderboard_plots``).

``--html`` writes the static site instead (``benchmarks.site``; default ``--out results/site``).
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

from benchmarks.leaderboard_plots import defence_order, defence_styles, write_plots
from benchmarks.records import params_label, record_row
from common.checkpoint import atomic_write_text

GROUP_KEYS = ["task", "dataset", "model", "scale", "attack", "defense", "budget"]
METRICS = [  # (column of results.csv, prefix of the leaderboard's mean/std columns)
    ("clean_acc_after", "clean_acc"), ("asr_after", "asr"), ("ra_after", "ra"), ("der", "der"),
    ("defense_time_s", "defense_time_s"), ("time_vs_nft", "time_vs_nft"),
]
VICTIM_KEYS = ["task", "dataset", "model", "scale", "attack", "budget", "seed"]
BEFORE = ["clean_acc_before", "asr_before", "ra_before"]
LEADERBOARD_COLUMNS = (
    GROUP_KEYS + ["clean_samples", "n_seeds", "seeds", "failed"] + BEFORE
    + [f"{p}_{s}" for _, p in METRICS for s in ("mean", "std")]
    + ["time_vs_nft_median", "nft_reference", "defense_name", "errors"]
)
# What ``clean_acc`` measures per task (the records keep every task's clean metric as a fraction in [0, 1]).
CLEAN_METRIC = {"image": "C-ACC", "pointcloud": "C-ACC", "detection": "mAP@0.5", "translation": "BLEU"}


def clean_metric(task: str) -> str:
    """The name of a task's clean metric: accuracy (C-ACC), mAP@0.5 or BLEU."""
    return CLEAN_METRIC.get(task, "clean metric")


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
        row["defense_params"] = json.dumps(cfg.get("defense_params") or {}, sort_keys=True, default=str)
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
    # each run's defence time over NFT's on the same victim, clean budget and seed: a ratio measured side by side,
    # where absolute CPU times mean little
    df["nft_reference"] = _nft_references(df)
    nft = df[(df["defense_name"] == "nft") & (df["status"] == "ok")]
    nft_time = nft.groupby(VICTIM_KEYS + ["defense"], dropna=False)["defense_time_s"].median()
    nft_time.index = nft_time.index.set_names("nft_reference", level="defense")
    df = df.join(nft_time.rename("nft_time_s"), on=VICTIM_KEYS + ["nft_reference"])
    df["time_vs_nft"] = df["defense_time_s"] / df["nft_time_s"]
    return df.drop(columns="nft_time_s"), notes


def _nft_references(df: pd.DataFrame) -> pd.Series:
    """Per run, the label of the NFT run its time is compared with, on the same victim, budget and seed.

    Options that two or more defences set on that victim are the grid's *family* options (a quick grid's
    ``batch_size``, ``steps``). A run is compared with an NFT run whose options are all family options and agree
    with its own (the most shared first, then the fewest: default NFT); an NFT variant with another NFT run whose
    options it all has (``nft[mixup=False]`` with ``nft``). Otherwise an NFT run with itself, and any other run with
    the NFT run of fewest options, so the ratio is never empty where NFT ran. ``none`` gets no reference."""
    params = df["defense_params"].map(json.loads)
    is_nft = df["defense_name"] == "nft"
    ok_nft = is_nft & (df["status"] == "ok") & df["defense_time_s"].notna()
    refs = pd.Series(None, index=df.index, dtype=object)
    for _, g in df.groupby(VICTIM_KEYS, dropna=False, sort=False):
        nft = {df.at[i, "defense"]: params[i] for i in g.index if ok_nft[i]}
        if not nft:
            continue
        setters: dict[str, set[str]] = {}
        for i in g.index:
            for key in params[i]:
                setters.setdefault(key, set()).add(df.at[i, "defense_name"])
        family = {k for k, names in setters.items() if len(names) >= 2}
        for i in g.index:
            if df.at[i, "defense_name"] != "none":
                refs[i] = _reference(df.at[i, "defense"], bool(is_nft[i]), params[i], nft, family)
    return refs


def _reference(label: str, is_nft: bool, options: dict[str, Any], nft: dict[str, dict[str, Any]],
               family: set[str]) -> str:
    def agrees(p: dict[str, Any]) -> bool:  # a baseline may lack a family option NFT has (ANP has no steps)
        return set(p) <= family and all(options.get(k, v) == v and (k in options or not is_nft) for k, v in p.items())

    matches = [n for n, p in nft.items() if n != label and agrees(p)]
    if matches:
        return min(matches, key=lambda n: (-sum(k in options for k in nft[n]), len(nft[n]), n))
    if is_nft and label in nft:
        return label
    return min(nft, key=lambda n: (len(nft[n]), n))


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


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, dataset, model, scale, attack, defence, budget): means/stds over the ``ok`` seeds, the
    median time ratio to NFT, the victim's before-metrics (mean over every run of the cell) and the count of
    failed runs."""
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
        # a run slowed by other work on a shared machine moves a mean, not a median
        row["time_vs_nft_median"] = ok["time_vs_nft"].median() if len(ok) else np.nan
        row["nft_reference"] = " ".join(sorted(set(ok["nft_reference"].dropna())))
        row["defense_name"] = g["defense_name"].iloc[0]
        errors = [str(e) for e in bad["error"].dropna().unique() if str(e)]
        row["errors"] = " | ".join(e[:200] for e in errors) or ("" if bad.empty else "(no error message)")
        out.append(row)
    agg = pd.DataFrame(out, columns=LEADERBOARD_COLUMNS)
    order = agg.assign(
        _d=agg["defense"].map(lambda d: defence_order(str(d))),
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
    metric = clean_metric(task)
    lines = [f"## {task} / {dataset}", ""]
    head = (f"| model | scale | attack | clean data | defence | seeds | {metric} before | ASR before | {metric} | ASR "
            "| RA | DER | time (s) | x NFT (median) | failed |")
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
            ratio = r["time_vs_nft_median"]
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
# The command.


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def load_frame(roots: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Every record under ``roots`` as one row each (``records_frame``), and a note per file skipped."""
    records, notes = load_records(find_records(roots))
    df, bad = records_frame(records)
    return df, notes + bad


def build_leaderboard(roots: Sequence[str | Path], out: str | Path, command: str | None = None,
                      plots: bool = True) -> dict[str, Any]:
    """Aggregate every record under ``roots`` into ``out``; returns what was written and what was skipped."""
    out = Path(out)
    df, notes = load_frame(roots)
    command = command or "nftbench leaderboard " + " ".join(shlex.quote(str(r)) for r in roots) + \
        f" --out {shlex.quote(str(out))}"
    n_failed = 0 if df.empty else int((df["status"] != "ok").sum())
    md = [
        "# Leaderboard", "",
        f"Regenerate with: `{command}`", "",
        f"{len(df)} run records ({n_failed} failed) from {', '.join(f'`{r}`' for r in roots)}. One row per model, "
        "scale, attack, defence and clean budget (with its number of clean samples); the clean metric (accuracy, "
        "mAP@0.5 or BLEU, named per task), ASR, RA and DER in %, mean ± sample std over the seeds that finished (the "
        "mean alone for one seed); *before* is the victim before any defence; time is the defence's wall time in "
        "seconds, and *x NFT* the median of its ratios to NFT's on the same victim, clean budget and seed (NFT with "
        "the options the grid gives every defence, else the paper's defaults). A failed run (status not `ok`) is "
        "counted in its row's *failed* column and listed under its table; a row whose every run failed reads "
        "**FAILED**. A browsable version: `nftbench leaderboard RESULTS_DIR --html` (`results/site/index.html`).",
        "",
    ]
    written: dict[str, Any] = {"csv": [], "plots": [], "records": len(df), "failed": n_failed, "notes": notes}
    if df.empty:
        md.append("(no run records found)\n")
    styles = {} if df.empty else defence_styles(df["defense"])
    for (task, dataset), part in ([] if df.empty else df.groupby(["task", "dataset"], sort=True)):
        agg = aggregate(part)
        csv_path = out / _safe(task) / f"{_safe(dataset)}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(csv_path, agg.to_csv(index=False, float_format="%.6g"))
        written["csv"].append(csv_path)
        plot_links: dict[str, str] = {}
        if plots:
            targets = write_plots(part, agg, f"{task}/{dataset}", clean_metric(task),
                                  out / "plots" / f"{_safe(task)}_{_safe(dataset)}", styles)
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
    p.add_argument("--out", default=None, help="where <task>/<dataset>.csv, LEADERBOARD.md and plots/ go (default "
                   "results), or with --html the site (default results/site)")
    p.add_argument("--no-plots", action="store_true", help="write the CSVs and the markdown only")
    p.add_argument("--html", action="store_true", help="write a self-contained static site (index.html, one page "
                   "per task and dataset, plots) instead of the CSVs and the markdown")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.html and args.no_plots:
        raise SystemExit("nftbench leaderboard: --no-plots applies to the markdown; drop it with --html")
    out = args.out or ("results/site" if args.html else "results")
    command = "nftbench leaderboard " + " ".join(shlex.quote(str(r)) for r in args.results) + \
        (" --html" if args.html else "") + f" --out {shlex.quote(str(out))}" + (" --no-plots" if args.no_plots else "")
    if args.html:
        from benchmarks.site import build_site

        written = build_site(args.results, out, command=command)
    else:
        written = build_leaderboard(args.results, out, command=command, plots=not args.no_plots)
    for note in written["notes"]:
        print(f"skipped: {note}", file=sys.stderr)
    main_file = written["index"] if args.html else written["markdown"]
    print(f"{written['records']} records ({written['failed']} failed) -> {main_file}")
    for p in written.get("pages", []) + written.get("csv", []) + written["plots"]:
        print(f"  {p}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nftbench leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
