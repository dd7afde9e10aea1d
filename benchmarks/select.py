"""Choose a defence variant honestly, then evaluate the choice elsewhere.

A defender never sees the attacker's trigger or the evaluation test set, so a default cannot be picked by the ASR
of the victims it is reported on. The rule here (issue 9; results/README.md, "What we found"): the defender tunes on a
*development* task it controls, with backdoors it plants itself (``benchmarks/configs/nft-dev-digits.yaml``:
sklearn digits, BadNets, Blend and Input-aware, three seeds), and picks the variant with the highest mean DER over
every development cell; a variant counts as better than the paper's default only when its mean paired DER gain
over the default (same victim, same seed) exceeds two standard errors. The chosen variant is then run, unchanged,
on the evaluation grid (``nft-ablations.yaml``, CIFAR-10), where ASR is reported but chooses nothing.

    python -m benchmarks.select results/nft-dev-digits [--defense nft] [--default nft]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from benchmarks.leaderboard import find_records, load_records, records_frame

CELL = ["task", "dataset", "model", "attack", "budget", "seed"]


def rank_variants(df: pd.DataFrame, defense: str = "nft", default: str = "nft") -> pd.DataFrame:
    """One row per variant of ``defense`` (its label, e.g. ``nft[eta=0.0]``), best mean DER first: cells, mean
    C-ACC drop and ASR after (%), mean and std of DER, the paired DER gain over ``default`` with its standard
    error, whether it beats the default (gain > 2 SE) and the mean defence time."""
    ok = df[(df["status"] == "ok") & (df["defense_name"] == defense)].copy()
    if ok.empty:
        raise ValueError(f"no finished {defense!r} records to rank")
    ok["drop"] = 100 * (ok["clean_acc_before"] - ok["clean_acc_after"])
    base = ok[ok["defense"] == default].set_index(CELL)["der"]
    rows = []
    for label, g in ok.groupby("defense", sort=False):
        gain = (g.set_index(CELL)["der"] - base).dropna()
        se = float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) >= 2 else float("nan")
        rows.append({
            "variant": label, "cells": len(g), "c_acc_drop": g["drop"].mean(), "asr_after": 100 * g["asr_after"].mean(),
            "der_mean": 100 * g["der"].mean(), "der_std": 100 * g["der"].std(ddof=1),
            "gain_vs_default": 100 * gain.mean() if len(gain) else float("nan"), "gain_se": 100 * se,
            "beats_default": bool(len(gain) >= 2 and gain.mean() > 2 * se and label != default),
            "time_s": g["defense_time_s"].mean(),
        })
    out = pd.DataFrame(rows)
    return out.sort_values(["der_mean", "time_s"], ascending=[False, True]).reset_index(drop=True)


def markdown(ranked: pd.DataFrame) -> str:
    lines = ["| variant | cells | C-ACC drop | ASR after | DER | gain vs default (SE) | beats default | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ranked.itertuples():
        lines.append(f"| {r.variant} | {r.cells} | {r.c_acc_drop:.2f} | {r.asr_after:.2f} | "
                     f"{r.der_mean:.2f} ± {r.der_std:.2f} | {r.gain_vs_default:+.2f} ({r.gain_se:.2f}) | "
                     f"{'yes' if r.beats_default else 'no'} | {r.time_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="sweep output folders (or record files) of the development grid")
    ap.add_argument("--defense", default="nft")
    ap.add_argument("--default", default="nft", help="the variant label that stands for the paper's defaults")
    ap.add_argument("--csv", default=None, help="also write the ranking here")
    args = ap.parse_args(argv)
    records, notes = load_records(find_records(args.roots))
    df, more = records_frame(records)
    for note in notes + more:
        print("note:", note)
    ranked = rank_variants(df, args.defense, args.default)
    print(markdown(ranked))
    best = ranked.iloc[0]
    verdict = "beats" if best.beats_default else "does not beat"
    print(f"\nchosen: {best.variant} (mean DER {best.der_mean:.2f}); it {verdict} {args.default} by the 2-SE rule")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        ranked.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
