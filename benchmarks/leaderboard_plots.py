"""Leaderboard figures: one set per task and dataset, every defence drawn with the same colour and marker everywhere.

matplotlib (object-oriented API on an Agg canvas: no pyplot, no global backend state) rather than an interactive
library: the same PNGs serve the README and the site, the dependency is already there, and a static image keeps
each page small and readable from ``file://`` (plotly's bundled JavaScript alone is megabytes per page). The
site's sortable tables and heat maps are where one explores.

- ``asr_vs_acc``: ASR against the clean metric after each defence, one panel per attack, on the setting (model,
  scale, budget) with the most cells;
- ``runtime``: each defence's wall time over NFT's on the same victim, budget and seed (median, quartiles);
- ``nft_budget``: NFT's ASR against its clean-data budget, one panel per attack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

PLOTS = ("asr_vs_acc", "runtime", "nft_budget")
MARKERS = ["o", "s", "^", "D", "v", "P", "*", "<", ">"]  # shapes that stay apart at 6 pt
NONE_STYLE = ("#7f7f7f", "X")  # no defence (the victim): a marker no defence uses
# distinct on white and from each other; black is NFT's
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
           "#000080", "#e6ab02", "#66a61e", "#a6761d", "#7570b3"]
AXIS = {"C-ACC": "clean accuracy (%)", "mAP@0.5": "clean mAP@0.5 (%)", "BLEU": "clean BLEU"}
Style = tuple[str, str]  # (colour, marker)


def _base(label: str) -> str:
    return str(label).split("[", 1)[0]


def defence_order(label: str) -> tuple[int, str, bool, str]:
    """none, then NFT and its variants, then the baselines by name (each one's default before its variants)."""
    base = _base(label)
    return {"none": 0, "nft": 1}.get(base, 2), base, label != base, str(label)


def defence_styles(labels: Iterable[str]) -> dict[str, Style]:
    """One (colour, marker) pair per defence label: the colour names the registered defence (black: NFT), the
    marker its variant; past len(MARKERS) variants the colour turns lighter. Pairs are distinct for up to
    len(PALETTE) baselines."""
    from matplotlib.colors import to_hex, to_rgb

    ordered = sorted(set(labels), key=defence_order)
    baselines = list(dict.fromkeys(_base(label) for label in ordered if _base(label) not in ("none", "nft")))
    styles: dict[str, Style] = {}
    for base in dict.fromkeys(_base(label) for label in ordered):
        colour = "#000000" if base == "nft" else PALETTE[baselines.index(base) % len(PALETTE)] if base != "none" \
            else NONE_STYLE[0]
        for j, label in enumerate(label for label in ordered if _base(label) == base):
            if base == "none":
                styles[label] = NONE_STYLE
                continue
            lighter = min(0.8, 0.45 * (j // len(MARKERS)))
            shade = to_hex([c + (1 - c) * lighter for c in to_rgb(colour)])
            styles[label] = (shade, MARKERS[j % len(MARKERS)])
    return styles


def _figure(width: float = 6.4, height: float = 4.8, constrained: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Lay the panels out inside ``rect`` (figure fractions; room left outside it for a figure legend), write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=rect)
    fig.savefig(path, format="png")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _handles(styles: dict[str, Style], labels: Iterable[str]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], ls="", marker=styles[d][1], color=styles[d][0], markersize=6, label=_wrap(d))
            for d in sorted(set(labels), key=defence_order)]


def _wrap(label: str, width: int = 34) -> str:
    """A long variant label over several lines, broken after its commas."""
    lines = [""]
    for part in label.replace(",", ", ").split(" "):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n  ".join(lines)


def _legend(fig, handles: list, title: str, columns: int) -> None:
    """Below the panels (never over data or titles), as many columns as the panels."""
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(columns, len(handles))), fontsize=7,
               title=title, title_fontsize=8, frameon=False)


def main_setting(agg: pd.DataFrame) -> tuple[str, str, str] | None:
    """The (model, scale, budget) with the most cells that finished: the grid a task's headline figure shows."""
    done = agg[agg["n_seeds"] > 0]
    if done.empty:
        return None
    counts = done.groupby(["model", "scale", "budget"], sort=True).size()
    return counts.idxmax()


def _facets(n: int, width: float, height: float, legend_rows: int):
    cols = max(3, min(4, n))
    rows = math.ceil(n / cols)
    fig = _figure(width * cols, height * rows + 1.0 + 0.17 * legend_rows, constrained=True)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _xlabel(axes, n: int, text: str) -> None:
    """The x label under the lowest panel of each column (a figure-wide label would sit under the legend)."""
    cols = max(3, min(4, n))
    for i in range(max(0, n - cols), n):
        axes[i].set_xlabel(text, fontsize=7)
        axes[i].xaxis.set_tick_params(labelbottom=True)


def plot_asr_vs_acc(agg: pd.DataFrame, title: str, metric: str, path: Path, styles: dict[str, Style]) -> None:
    """ASR against the clean metric after each defence, one panel per attack: a point per defence, mean ± std over
    seeds, on the task's main setting (the others are in the site's table)."""
    setting = main_setting(agg)
    pts = agg.iloc[0:0] if setting is None else agg[
        (agg[["model", "scale", "budget"]].apply(tuple, axis=1) == setting) & (agg["n_seeds"] > 0)
        & agg["asr_mean"].notna() & agg["clean_acc_mean"].notna()]
    if pts.empty:
        fig = _figure(constrained=True)
        _empty(fig.add_subplot(), "no successful runs of a backdoored victim")
        fig.suptitle(f"{title}: ASR vs {metric}", fontsize=10)
        _save(fig, path)
        return
    attacks = sorted(pts["attack"].unique())
    handles = _handles(styles, pts["defense"])
    fig, axes = _facets(len(attacks), 2.7, 2.3, sum(h.get_label().count("\n") + 1 for h in handles) // 3 + 2)
    for ax, attack in zip(axes, attacks, strict=False):
        for _, r in pts[pts["attack"] == attack].iterrows():
            colour, marker = styles[r["defense"]]
            ax.errorbar(100 * r["clean_acc_mean"], 100 * r["asr_mean"],
                        xerr=None if pd.isna(r["clean_acc_std"]) else 100 * r["clean_acc_std"],
                        yerr=None if pd.isna(r["asr_std"]) else 100 * r["asr_std"],
                        fmt=marker, color=colour, markersize=6, capsize=2, elinewidth=0.8)
        ax.set_title(attack, fontsize=8)
        ax.set_ylim(-4, 104)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    _legend(fig, handles, "defence (colour: method, marker: variant)", 3)
    model, scale, budget = setting
    fig.suptitle(f"{title}: ASR vs {metric} after each defence (mean ± std over seeds)\n"
                 f"{model or 'default model'}, {scale or 'default'} scale, clean budget {budget}", fontsize=9)
    _xlabel(axes, len(attacks), f"{AXIS.get(metric, metric)} after the defence")
    fig.supylabel("attack success rate after the defence (%)", fontsize=8)
    _save(fig, path)


def plot_runtime(df: pd.DataFrame, title: str, path: Path, styles: dict[str, Style]) -> None:
    """Each defence's wall time over NFT's on the same victim, budget and seed: median bar, 25-75% whisker, over
    every successful run (attacks, budgets, seeds); seconds where no NFT ran. Horizontal, so long names fit."""
    ok = df[(df["status"] == "ok") & df["defense_time_s"].notna() & (df["defense_name"] != "none")]
    ratio = ok["time_vs_nft"].notna().any()
    column = "time_vs_nft" if ratio else "defense_time_s"
    ok = ok[ok[column].notna()]
    if ok.empty:
        fig = _figure(constrained=True)
        _empty(fig.add_subplot(), "no timed defence runs")
        fig.suptitle(f"{title}: defence wall time", fontsize=10)
        _save(fig, path)
        return
    g = ok.groupby("defense")
    stats = pd.DataFrame({"median": g[column].median(), "q25": g[column].quantile(0.25),
                          "q75": g[column].quantile(0.75), "n": g.size(), "secs": g["defense_time_s"].median()})
    stats = stats.loc[sorted(stats.index, key=defence_order)]
    fig = _figure(7.5, 1.4 + 0.3 * len(stats), constrained=True)
    ax = fig.add_subplot()
    y = np.arange(len(stats))[::-1]
    err = np.vstack([stats["median"] - stats["q25"], stats["q75"] - stats["median"]])
    ax.barh(y, stats["median"], xerr=err, capsize=2, color=[styles[d][0] for d in stats.index], alpha=0.85)
    ax.set_yticks(y, [_wrap(d, 48) for d in stats.index], fontsize=7)
    for yi, (_, r) in zip(y, stats.iterrows(), strict=True):
        text = (f" x{r['median']:.2g}, {r['secs']:.3g} s" if ratio else f" {r['median']:.3g} s") + f" (n={r['n']:.0f})"
        ax.text(r["q75"], yi, text, va="center", fontsize=6)
    positive = stats["median"][stats["median"] > 0]
    if len(positive) and positive.max() / positive.min() >= 10:
        ax.set_xscale("log")
        ax.set_xlim(stats["q25"][stats["q25"] > 0].min() / 3, stats["q75"].max() * 40)  # room for the labels
    else:
        ax.set_xlim(0, stats["q75"].max() * 1.6)
    if ratio:
        ax.axvline(1, color="0.4", lw=0.8, ls="--")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("wall time / NFT's on the same victim, budget and seed\n(bar: median; whisker: quartiles)" if ratio
                  else "defence wall time, s (bar: median; whisker: quartiles)", fontsize=8)
    device = ok["device"].dropna().unique()
    where = f" on {device[0]}" if len(device) == 1 else ""
    ax.set_title(f"{title}: defence wall time{where}\nlabels: median ratio, median seconds, runs", fontsize=8)
    _save(fig, path)


def plot_nft_budget(agg: pd.DataFrame, title: str, path: Path, styles: dict[str, Style]) -> None:
    """NFT's ASR against its clean-data budget, one panel per attack that NFT ran at two budgets or more, a line per
    NFT variant (line style: model); budgets sit on one axis by their number of clean samples (per-class and
    fractional alike)."""
    nft = agg[(agg["defense_name"] == "nft") & (agg["n_seeds"] > 0) & agg["asr_mean"].notna()
              & agg["clean_samples"].notna()]
    if nft.empty:
        fig = _figure(constrained=True)
        _empty(fig.add_subplot(), "no successful NFT runs on a backdoored victim")
        fig.suptitle(f"{title}: NFT's ASR vs clean-data budget", fontsize=10)
        _save(fig, path)
        return
    from matplotlib.lines import Line2D

    budgets = nft.groupby("attack")["clean_samples"].nunique()
    attacks = sorted(budgets.index[budgets >= 2]) or sorted(budgets.index)  # a panel with one budget says nothing
    nft = nft[nft["attack"].isin(attacks)]
    models = sorted(set(zip(nft["model"], nft["scale"], strict=True)))
    dashes = ["-", "--", ":", "-."]
    handles = _handles(styles, nft["defense"])
    if len(models) > 1:
        handles += [Line2D([], [], color="0.3", ls=dashes[i % len(dashes)], label=f"{m or 'default'} ({s})")
                    for i, (m, s) in enumerate(models)]
    fig, axes = _facets(len(attacks), 2.8, 2.4, len(handles) // 3 + 2)
    ticks = nft.groupby("clean_samples")["budget"].agg(lambda b: " / ".join(sorted(set(b))))
    log = ticks.index.max() / max(ticks.index.min(), 1) >= 10
    for ax, attack in zip(axes, attacks, strict=False):
        part = nft[nft["attack"] == attack]
        for (defense, model, scale), g in part.groupby(["defense", "model", "scale"], sort=True):
            g = g.sort_values("clean_samples")
            colour, marker = styles[defense]
            ax.errorbar(g["clean_samples"], 100 * g["asr_mean"], yerr=100 * g["asr_std"].fillna(0), marker=marker,
                        color=colour, ls=dashes[models.index((model, scale)) % len(dashes)], capsize=2, markersize=5)
        ax.set_title(attack, fontsize=8)
        ax.set_ylim(-4, 104)
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
        ax.set_xticks(list(ticks.index), [f"{int(n)}\n{b}" for n, b in ticks.items()], fontsize=6)
        ax.minorticks_off()
        ax.tick_params(axis="y", labelsize=7)
    _legend(fig, handles, "NFT variant (line style: model)" if len(models) > 1 else "NFT variant", 3)
    fig.suptitle(f"{title}: NFT's ASR vs clean-data budget (mean ± std over seeds)", fontsize=9)
    _xlabel(axes, len(attacks), "clean samples given to NFT (budget)")
    fig.supylabel("attack success rate after NFT (%)", fontsize=8)
    _save(fig, path)


def write_plots(df: pd.DataFrame, agg: pd.DataFrame, title: str, metric: str, stem: Path,
                styles: dict[str, Style]) -> dict[str, Path]:
    """The three figures of one task and dataset as ``<stem>_<plot>.png``; returns their paths by plot name."""
    targets = {name: stem.with_name(f"{stem.name}_{name}.png") for name in PLOTS}
    plot_asr_vs_acc(agg, title, metric, targets["asr_vs_acc"], styles)
    plot_runtime(df, title, targets["runtime"], styles)
    plot_nft_budget(agg, title, targets["nft_budget"], styles)
    return targets
