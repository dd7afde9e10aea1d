"""The paper's CIFAR-10 Table 1 beside measured grades: ``python -m benchmarks.paper_compare``.

``--grade fast=results/cifar10-fast --grade quick=results/cifar10-quick`` reads each folder's run records (CIFAR-10,
one clean budget, ``ok`` runs only) and writes two markdown tables:

- per attack and defence: ASR after and clean-accuracy drop (victim's before minus after, per run), mean ± sample
  std over seeds, for the paper (``paper_table1_cifar10.json``; "n/r" where it reports no such cell) and each grade;
- per defence, averaged over the attacks every grade measured for it: ASR after, ASR drop, clean-accuracy drop and
  DER (means over attacks of the per-attack seed means; DER's spread is over seeds, from the per-seed attack
  means), each defence's rank by that DER in its grade (among the defences measured on the most attacks), and its
  median wall time over NFT's on the same victim, budget and seed; the paper column gives its Table 1 average over
  its 14 attacks (ASR drop / clean-accuracy drop), which is not the same attack set and is marked so.

Numbers come from the records alone; nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from benchmarks.leaderboard import load_frame
from benchmarks.leaderboard_plots import defence_order
from benchmarks.plan import split_outside_brackets
from benchmarks.site import load_paper
from common.checkpoint import atomic_write_text

GRADE_HELP = "LABEL=RESULTS_DIR, repeatable, in column order (e.g. fast=results/cifar10-fast)"


def _pm(values: pd.Series, scale: float = 100.0) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    mean = scale * v.mean()
    return f"{mean:.1f}" if len(v) < 2 else f"{mean:.1f} ± {scale * v.std(ddof=1):.1f}"


def measured_runs(folder: str | Path, budget: str) -> pd.DataFrame:
    """The ``ok`` CIFAR-10 runs of a results folder at one clean budget, with per-run drops."""
    df, _ = load_frame([folder])
    if df.empty:
        return df
    df = df[(df["status"] == "ok") & (df["task"] == "image") & (df["dataset"] == "cifar10")
            & (df["budget"] == budget) & (df["defense_name"] != "none")].copy()
    df["clean_drop"] = df["clean_acc_before"] - df["clean_acc_after"]
    df["asr_drop"] = df["asr_before"] - df["asr_after"]
    return df


def per_attack_table(grades: dict[str, pd.DataFrame], paper: dict) -> str:
    """Rows (attack, defence) measured in any grade: paper | each grade, as 'ASR after / clean drop' in %."""
    victims = {c["attack"]: c["clean_acc"] for c in paper["cells"] if c["defense"] == "none"}
    cells = {(c["attack"], c["defense"]): c for c in paper["cells"]}
    keys = sorted({k for df in grades.values() for k in zip(df["attack"], df["defense"], strict=True)},
                  key=lambda k: (k[0], defence_order(k[1])))
    head = ["attack", "defence", "paper: ASR / C-ACC drop"] + [f"{g}: ASR / C-ACC drop (seeds)" for g in grades]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for attack, defence in keys:
        p = cells.get((attack, defence))
        row = [attack, defence,
               f"{p['asr']:.1f} / {victims[attack] - p['clean_acc']:.1f}" if p and attack in victims else "n/r"]
        for df in grades.values():
            g = df[(df["attack"] == attack) & (df["defense"] == defence)]
            row.append("-" if g.empty else f"{_pm(g['asr_after'])} / {_pm(g['clean_drop'])} ({g['seed'].nunique()})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_defence(df: pd.DataFrame, attacks: list[str]) -> dict[str, float | str]:
    """Means over ``attacks`` of the per-attack seed means, each with its spread over the seeds that ran every
    attack (the sample std of the per-seed attack means), and the median time over NFT's."""
    g = df[df["attack"].isin(attacks)]
    cols = ["asr_after", "asr_drop", "clean_drop", "der"]
    cell = g.groupby("attack")[cols].mean()
    by_seed = g.groupby("seed").agg(n=("attack", "nunique"), **{c: (c, "mean") for c in cols})
    complete = by_seed[by_seed["n"] == len(attacks)]

    def pm(col: str) -> str:
        spread = f" ± {100 * complete[col].std(ddof=1):.1f}" if len(complete) >= 2 else ""
        return f"{100 * cell[col].mean():.1f}{spread}"

    ratio = g["time_vs_nft"].median()
    return {"asr": pm("asr_after"), "asr_drop": f"{100 * cell['asr_drop'].mean():.1f}", "clean_drop": pm("clean_drop"),
            "der_value": 100 * cell["der"].mean(), "der": pm("der"), "seeds": len(complete),
            "x_nft": "-" if math.isnan(ratio) else f"{ratio:.2f}"}


Rows = tuple[dict[str, dict[str, dict]], dict[str, list[str]]]  # what defence_rows returns


def defence_rows(grades: dict[str, pd.DataFrame]) -> Rows:
    """defence -> grade -> :func:`per_defence` over the attacks every grade that ran the defence measured for it
    (with its DER rank in the grade), and defence -> those attacks."""
    defences = sorted({d for df in grades.values() for d in df["defense"]}, key=defence_order)
    rows: dict[str, dict[str, dict]] = {}
    attacks: dict[str, list[str]] = {}
    for d in defences:
        present = {g: df[df["defense"] == d] for g, df in grades.items() if (df["defense"] == d).any()}
        attacks[d] = sorted(set.intersection(*(set(df["attack"]) for df in present.values())))
        if attacks[d]:
            rows[d] = {g: per_defence(df, attacks[d]) for g, df in present.items()}
    # rank by DER within each grade, among the defences every grade measured on the most attacks (a mean over
    # other attacks is not comparable); the others get no rank
    everywhere = [d for d in rows if len(rows[d]) == len(grades)]
    widest = max((len(attacks[d]) for d in everywhere), default=0)
    ranked = [d for d in everywhere if len(attacks[d]) == widest]
    for g in grades:
        ranks = {d: i for i, d in enumerate(sorted(ranked, key=lambda d: -rows[d][g]["der_value"]), 1)}
        for d in rows:
            if g in rows[d]:
                rows[d][g]["rank"] = ranks.get(d, "-")
    return rows, {d: attacks[d] for d in rows}


def _paper_average(paper: dict, defence: str) -> str:
    a = {a["defense"]: a for a in paper["averages"]}.get(defence)
    return f"{a['asr_drop']:.1f} / {a['clean_acc_drop']:.1f}" if a else "n/r"


def summary_table(grades: dict[str, pd.DataFrame], paper: dict, computed: Rows) -> str:
    """Per defence: the paper's 14-attack averages and each grade's means over the attacks every grade that ran
    the defence measured ("-" in a grade that did not run it); ``computed`` is :func:`defence_rows`'s result."""
    rows, attacks = computed
    head = ["defence", "attacks", f"paper ({paper['averages_over_attacks']} attacks): ASR drop / C-ACC drop"]
    for g in grades:
        head += [f"{g}: ASR after", f"{g}: ASR drop / C-ACC drop", f"{g}: DER (rank)", f"{g}: x NFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, by_grade in rows.items():
        row = [d, ", ".join(attacks[d]), _paper_average(paper, d)]
        for g in grades:
            m = by_grade.get(g)
            row += ([m["asr"], f"{m['asr_drop']} / {m['clean_drop']}", f"{m['der']} ({m['rank']})", m["x_nft"]]
                    if m else ["-"] * 4)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def headline_table(grades: dict[str, pd.DataFrame], paper: dict, defences: list[str]) -> str:
    """The README's table: for ``defences`` in that order, the paper's averages beside each grade's ASR after and
    C-ACC drop (mean ± std over seeds, seed count) and DER rank, all over the attacks the first defence has in
    every grade ("-" where a defence did not run them all)."""
    rows, attacks = defence_rows(grades)
    missing = [d for d in defences if d not in rows]
    if missing:
        raise ValueError(f"--headline {','.join(missing)}: not measured in any grade; measured: {', '.join(rows)}")
    base = attacks[defences[0]]
    head = [f"defence ({', '.join(base)})", f"paper ({paper['averages_over_attacks']} attacks): ASR drop / C-ACC drop"]
    head += [f"{g}: ASR after / C-ACC drop (seeds), DER rank" for g in grades]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in defences:
        cells = []
        for g, df in grades.items():
            runs = df[df["defense"] == d]
            if attacks[d] == base and g in rows[d]:
                m = rows[d][g]
            elif set(base) <= set(runs["attack"]):
                m = {**per_defence(runs, base), "rank": "-"}  # ranked over another attack set
            else:
                cells.append("-")
                continue
            cells.append(f"{m['asr']} / {m['clean_drop']} ({m['seeds']}), {m['rank']}")
        lines.append("| " + " | ".join([d, _paper_average(paper, d), *cells]) + " |")
    return "\n".join(lines)


def rank_agreement(grades: dict[str, pd.DataFrame], computed: Rows) -> str:
    """Spearman's rho between the first grade's DER ranks and each other grade's, over the defences ranked in all
    (ranks from ``computed``, :func:`defence_rows`'s result)."""
    rows, _ = computed
    ranked = [d for d in rows if all(g in rows[d] and isinstance(rows[d][g]["rank"], int) for g in grades)]
    first, *others = grades
    if not others or len(ranked) < 3:
        return ""
    ranks = pd.DataFrame({g: [rows[d][g]["rank"] for d in ranked] for g in grades})
    rhos = ", ".join(f"{first} vs {g}: ρ = {ranks[first].corr(ranks[g], method='spearman'):.2f}" for g in others)
    return f"DER rank agreement (Spearman, over the {len(ranked)} defences ranked in every grade): {rhos}."


def build(grades: dict[str, str | Path], budget: str = "0.01", headline: list[str] | None = None) -> str:
    """Both tables as markdown, with the paper's source and the folders read; with ``headline`` (defence labels),
    the README's short table alone."""
    paper = load_paper()
    frames = {label: measured_runs(folder, budget) for label, folder in grades.items()}
    empty = [label for label, df in frames.items() if df.empty]
    if empty:
        raise ValueError(f"no ok CIFAR-10 runs at budget {budget} in grade(s) {', '.join(empty)}: "
                         "give folders holding records/ of cifar10 sweeps")
    if headline:
        return headline_table(frames, paper, headline)
    read = ", ".join(f"{label} = `{folder}`" for label, folder in grades.items())
    computed = defence_rows(frames)
    return "\n".join([
        f"Paper: {paper['source']}. {paper['setting']}", "",
        f"Measured ({read}), clean budget {budget}; ASR after and C-ACC drop in %, mean ± std over seeds; "
        "n/r: the paper reports no such cell.", "",
        "### Per defence", "", summary_table(frames, paper, computed), "", rank_agreement(frames, computed), "",
        "### Per attack and defence", "", per_attack_table(frames, paper), ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--grade", action="append", required=True, metavar="LABEL=DIR", help=GRADE_HELP)
    p.add_argument("--budget", default="0.01", help="clean budget of the runs compared (default 0.01)")
    p.add_argument("--out", default=None, help="write the markdown here as well as printing it")
    p.add_argument("--headline", default=None, metavar="DEFENCES",
                   help="only the README's short table, for these defence labels in this order "
                        "(e.g. nft,nft[mixup=False],anp)")
    args = p.parse_args(argv)
    grades = {}
    for spec in args.grade:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            p.error(f"--grade {spec!r}: give LABEL=RESULTS_DIR")
        grades[label] = folder
    try:
        text = build(grades, args.budget, args.headline and split_outside_brackets(args.headline))
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"paper_compare: {e}\n")
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
