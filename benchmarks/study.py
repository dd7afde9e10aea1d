"""NFT under the microscope (issue 9): the study's tables and plots, rebuilt from its four sweeps.

Each part is one sweep of the NFT engine's options (no forks); run them into one folder, then this report::

    nftbench sweep nft-dev-digits --out results/ablations/dev-digits
    nftbench sweep nft-ablations  --out results/ablations/variants --data-root DATA
    nftbench sweep nft-budgets    --out results/ablations/budgets  --data-root DATA
    nftbench sweep nft-scale      --out results/ablations/scale    --data-root DATA
    python -m benchmarks.study results/ablations

It writes, next to the sweeps, whichever of these the finished records allow:

- ``dev_ranking.csv``: the variants ranked on the development grid by the honest rule (``benchmarks.select``);
- ``variants.csv``: attack x variant on the evaluation grid: C-ACC, ASR, RA, DER (mean and std over seeds),
  defence time and its ratio to the paper default's on the same victim and seed (mean and median), and the learnt
  masks' mean and count below 0.5 (mean over seeds);
- ``budgets.csv``: NFT and fine-tuning against the clean budget; ``scale.csv``: NFT against model size, with each
  model's parameter count and number of masked neurons;
- ``study.md`` with those tables, and ``plots/{variants,budgets,scale}.png``.

The sweeps' defence times come from whatever else the machine was running, so the variants table gives their
medians. When ``root/perf.json`` exists (``nftbench perf --variants nft-ablations --dataset cifar10 --json
results/ablations/perf.json``: every variant timed side by side in one run on one victim), it adds that run's
ratios in a column of their own.

ASR appears in the evaluation tables because they are evaluation; only ``dev_ranking`` chooses anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.leaderboard import GROUP_KEYS, aggregate, find_records, load_records, records_frame
from benchmarks.leaderboard_plots import MARKERS, _empty, _figure, _save
from benchmarks.select import markdown as ranking_markdown
from benchmarks.select import rank_variants
from common.checkpoint import atomic_write_text

PARTS = ("dev-digits", "variants", "budgets", "scale")
# The NFT engine's summary of the learnt masks (defenses/nft.py, its record's defense_info): column -> key.
MASK_STATS = {"mask_neurons": "mask_neurons", "mask_mean": "mask_mean", "masks_below_half": "mask_below_0.5"}
COLUMNS = ["attack", "model", "defense", "budget", "clean_samples", "n_seeds", "seeds", "failed",
           "clean_acc_before", "asr_before", "clean_acc_mean", "clean_acc_std", "asr_mean", "asr_std",
           "ra_mean", "ra_std", "der_mean", "der_std", "defense_time_s_mean", "time_vs_nft_mean", "time_vs_nft_median"]


def load_part(folder: Path) -> pd.DataFrame:
    """Every record under ``folder`` as one row each (``leaderboard.records_frame``), plus each run's mask count."""
    records, _ = load_records(find_records([folder]))
    df, _ = records_frame(records)
    if not df.empty:
        info = {r.get("run_id"): r.get("defense_info") or {} for r in records}
        for column, key in MASK_STATS.items():
            df[column] = df["run_id"].map(lambda i, key=key: info.get(i, {}).get(key))
    return df


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Leaderboard aggregation (means and stds over seeds), restricted to the study's columns, plus, over the
    ``ok`` seeds, the median defence time and time ratio to the paper default (a run slowed by other work on a
    shared machine moves a mean, not a median) and the mean of the learnt masks' statistics (NFT runs only)."""
    ok = df[df["status"] == "ok"]
    extra = ok.groupby(GROUP_KEYS, dropna=False)[["defense_time_s"]].median().add_suffix("_median")
    stats = [c for c in MASK_STATS if c != "mask_neurons" and c in df]
    if stats:
        extra = extra.join(ok.groupby(GROUP_KEYS, dropna=False)[stats].mean())
    return aggregate(df).merge(extra.reset_index(), on=GROUP_KEYS, how="left")[COLUMNS + list(extra.columns)]


def _cell(r: Any) -> str:
    if r.n_seeds == 0:
        return "failed" if r.failed else "-"
    sd = "" if pd.isna(r.asr_std) else f" ± {100 * r.asr_std:.1f}"
    csd = "" if pd.isna(r.clean_acc_std) else f" ± {100 * r.clean_acc_std:.1f}"
    return f"{100 * r.clean_acc_mean:.1f}{csd} / {100 * r.asr_mean:.1f}{sd} ({r.n_seeds})"


def side_by_side(path: Path) -> dict[str, Any] | None:
    """``nftbench perf --variants ... --json PATH``'s result, or None when there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def variants_markdown(t: pd.DataFrame, perf: dict[str, Any] | None = None) -> str:
    """Rows: the victim ('none') and each variant; columns: each attack's C-ACC / ASR (seeds), the median defence
    time in the sweeps, the median ratio to the paper default's time on the same victim and seed, and, when
    ``perf`` is given, the ratio measured side by side in that one run."""
    attacks = list(dict.fromkeys(t["attack"]))
    variants = list(dict.fromkeys(t["defense"]))
    one_run = {r["defense"]: r.get("ratio_to_nft") for r in perf["defenses"]} if perf else None
    head = " | time (s, median) | x default (median)" + (" | x default (one run)" if perf else "")
    lines = ["| variant | " + " | ".join(attacks) + head + " |", "|---" * (len(attacks) + 3 + bool(perf)) + "|"]
    for v in variants:
        rows = t[t["defense"] == v].set_index("attack")
        cells = [_cell(rows.loc[a]) if a in rows.index else "-" for a in attacks]
        ratios = [rows["time_vs_nft_median"].median()] + ([one_run.get(v)] if perf else [])
        if v == "none":
            tail = ["-"] * (1 + len(ratios))
        else:
            tail = [f"{rows['defense_time_s_median'].median():.0f}"]
            tail += ["-" if r is None or pd.isna(r) else f"{r:.2f}" for r in ratios]
        lines.append(f"| {v} | " + " | ".join(cells + tail) + " |")
    return "\n".join(lines)


def budgets_markdown(t: pd.DataFrame) -> str:
    """Rows: clean budget (its number of samples); columns: each attack x defence, C-ACC / ASR (seeds)."""
    keys = list(dict.fromkeys(zip(t["attack"], t["defense"], strict=True)))  # aggregate's order: nft first
    keys = [k for k in keys if k[1] != "none"]
    t = t[t["defense"] != "none"].sort_values("clean_samples", kind="stable")
    lines = ["| clean budget | " + " | ".join(f"{a}: {d}" for a, d in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for (budget, n), g in t.groupby(["budget", "clean_samples"], sort=False):
        rows = g.set_index(["attack", "defense"])
        cells = [_cell(rows.loc[k]) if k in rows.index else "-" for k in keys]
        lines.append(f"| {budget} ({int(n)} images) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parameter_count(model_label: str, num_classes: int = 10) -> int | None:
    """Parameters of an image model given its leaderboard label (``name`` or ``name[width=0.5]``); None when the
    label is not a registered image model."""
    from tasks.image_models import IMAGE_MODELS

    name, _, opts = model_label.partition("[")
    kwargs = dict(kv.split("=", 1) for kv in opts.rstrip("]").split(",") if kv)
    try:
        model = IMAGE_MODELS.get(name)(num_classes=num_classes, **{k: float(v) for k, v in kwargs.items()})
    except (KeyError, ValueError, TypeError):
        return None
    return sum(p.numel() for p in model.parameters())


def scale_table(df: pd.DataFrame) -> pd.DataFrame:
    t = table(df)
    t.insert(2, "params", t["model"].map(parameter_count))
    masks = df[df["status"] == "ok"].groupby("model")["mask_neurons"].max()
    t.insert(3, "mask_neurons", t["model"].map(masks))
    return t.sort_values(["attack", "params"], kind="stable")


def scale_markdown(t: pd.DataFrame) -> str:
    """Rows: model (parameters, masked neurons); columns: each attack's victim and NFT, C-ACC / ASR (seeds)."""
    attacks = list(dict.fromkeys(t["attack"]))
    defenses = list(dict.fromkeys(t["defense"]))
    keys = [(a, d) for a in attacks for d in defenses]
    lines = ["| model | params | masked neurons | " + " | ".join(f"{a}: {d}" for a, d in keys) + " |",
             "|---" * (len(keys) + 3) + "|"]
    for model, g in t.groupby("model", sort=False):
        rows = g.set_index(["attack", "defense"])
        cells = [_cell(rows.loc[k]) if k in rows.index else "-" for k in keys]
        params = g["params"].iloc[0]
        masks = g["mask_neurons"].dropna()
        lines.append(f"| {model} | {'-' if pd.isna(params) else f'{params / 1e6:.2f}M'} | "
                     f"{int(masks.iloc[0]) if len(masks) else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_variants(t: pd.DataFrame, path: Path) -> None:
    """One panel per attack: each variant's clean accuracy against its ASR (mean ± std over seeds)."""
    attacks = list(dict.fromkeys(t["attack"]))
    fig = _figure(4.2 * max(1, len(attacks)), 5.6)
    variants = list(dict.fromkeys(t["defense"]))
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    markers = {v: MARKERS[i // 10 % len(MARKERS)] for i, v in enumerate(variants)}
    for i, attack in enumerate(attacks or ["-"]):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        pts = t[(t["attack"] == attack) & (t["n_seeds"] > 0)]
        if pts.empty:
            _empty(ax, "no finished runs")
            continue
        for r in pts.itertuples():
            ax.errorbar(100 * r.asr_mean, 100 * r.clean_acc_mean, xerr=np.nan_to_num(100 * r.asr_std),
                        yerr=np.nan_to_num(100 * r.clean_acc_std), fmt=markers[r.defense], color=colours[r.defense],
                        capsize=2, label=r.defense)
        ax.set_xlim(-3, 103)
        ax.set_xlabel("ASR after (%)")
        ax.set_ylabel("clean accuracy after (%)")
        ax.set_title(attack, fontsize=9)
    handles = {}
    for ax in fig.axes:  # one legend for all panels, below them, so it hides no point
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=7, frameon=False)
    _save(fig, path, rect=(0, 0.15, 1, 1))


def plot_lines(t: pd.DataFrame, x: str, xlabel: str, path: Path) -> None:
    """One panel per attack: ASR (solid) and clean accuracy (dashed) against ``x`` (log scale), one colour per
    defence; mean ± std over seeds."""
    attacks = list(dict.fromkeys(t["attack"]))
    fig = _figure(4.2 * max(1, len(attacks)), 4.0)
    defenses = list(dict.fromkeys(t["defense"]))
    for i, attack in enumerate(attacks or ["-"]):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        pts = t[(t["attack"] == attack) & (t["n_seeds"] > 0) & t[x].notna()]
        if pts.empty:
            _empty(ax, "no finished runs")
            continue
        for j, d in enumerate(defenses):
            g = pts[pts["defense"] == d].sort_values(x)
            if g.empty:
                continue
            ax.errorbar(g[x], 100 * g["asr_mean"], yerr=np.nan_to_num(100 * g["asr_std"]), color=f"C{j}",
                        marker="o", capsize=2, label=f"{d}: ASR")
            ax.errorbar(g[x], 100 * g["clean_acc_mean"], yerr=np.nan_to_num(100 * g["clean_acc_std"]),
                        color=f"C{j}", marker="s", ls="--", capsize=2, label=f"{d}: C-ACC")
        ax.set_xscale("log")
        ax.set_ylim(-3, 103)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.set_title(attack, fontsize=9)
        if i == 0:
            ax.legend(fontsize=6)
    _save(fig, path)


def build_study(root: str | Path) -> dict[str, Path]:
    """Read ``root/<part>`` for each part in PARTS that exists; write the CSVs, ``study.md`` and plots into
    ``root``. Returns what was written."""
    root = Path(root)
    written: dict[str, Path] = {}
    md = ["# NFT under the microscope", "",
          f"Regenerate with: `python -m benchmarks.study {root}`. Cells: clean accuracy / ASR in % after the "
          "defence, mean ± sample std over seeds (number of seeds); `none` is the victim. The development ranking "
          "is the only table that chooses anything (benchmarks/select.py).", ""]

    def out(name: str, frame: pd.DataFrame) -> None:
        atomic_write_text(root / name, frame.to_csv(index=False, float_format="%.6g"))
        written[name] = root / name

    parts = {p: load_part(root / p) for p in PARTS if (root / p).is_dir()}
    parts = {p: df for p, df in parts.items() if not df.empty}
    if "dev-digits" in parts:
        ranked = rank_variants(parts["dev-digits"])
        out("dev_ranking.csv", ranked)
        best = ranked.iloc[0]
        md += ["## Development ranking (digits; chooses the variant)", "", ranking_markdown(ranked), "",
               f"Chosen: `{best.variant}`; it {'beats' if best.beats_default else 'does not beat'} the paper "
               "default by the 2-SE rule.", ""]
    if "variants" in parts:
        t = table(parts["variants"])
        out("variants.csv", t)
        plot_variants(t, root / "plots" / "variants.png")
        written["variants.png"] = root / "plots" / "variants.png"
        perf = side_by_side(root / "perf.json")
        md += ["## Variants (evaluation)", "", variants_markdown(t, perf), ""]
        if perf:
            md += [f"Time ratios from one run on one victim (`perf.json`): {perf['device']}, {perf['attack']} "
                   f"victim {perf['victim']['victim_id']}, seed {perf['seed']}, {perf['mode']}.", ""]
        md += ["![variants](plots/variants.png)", ""]
    if "budgets" in parts:
        t = table(parts["budgets"])
        out("budgets.csv", t)
        plot_lines(t[t["defense"] != "none"], "clean_samples", "clean images given to the defence",
                   root / "plots" / "budgets.png")
        written["budgets.png"] = root / "plots" / "budgets.png"
        md += ["## Clean-data budget", "", budgets_markdown(t), "", "![budgets](plots/budgets.png)", ""]
    if "scale" in parts:
        t = scale_table(parts["scale"])
        out("scale.csv", t)
        plot_lines(t, "params", "model parameters", root / "plots" / "scale.png")
        written["scale.png"] = root / "plots" / "scale.png"
        md += ["## Model scale", "", scale_markdown(t), "", "![scale](plots/scale.png)", ""]
    if not parts:
        md.append(f"(no finished records under {', '.join(str(root / p) for p in PARTS)})")
    atomic_write_text(root / "study.md", "\n".join(md) + "\n")
    written["study.md"] = root / "study.md"
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default="results/ablations",
                    help=f"folder holding the sweeps {', '.join(PARTS)} (default: results/ablations)")
    args = ap.parse_args(argv)
    for name, path in build_study(args.root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
