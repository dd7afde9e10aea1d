"""The leaderboard as a static site: ``nftbench leaderboard RESULTS_DIR --html [--out results/site]``.

Writes ``index.html`` (tasks and datasets, run counts, date, commit, the regenerating command), one page per task
and dataset (rankings by mean DER, attack x defence heat maps of ASR and of the clean-metric drop, a sortable,
filterable table of every cell, the figures, the failed runs), ``plots/*.png`` and the pages' shared ``site.css`` and
``site.js`` (from ``site_assets/``, linked relatively): no server, no CDN, it works from ``file://`` and any static
host.
Each cell opens a detail view: its runs (seed, metrics, times, device, versions), the defence's options, a link to
each run record and the ``nftbench run`` command that reproduces it. Where NFT's paper reports a CIFAR-10 cell
(``paper_table1_cifar10.json``), its number sits beside ours.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import MISSING, fields
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.leaderboard import GROUP_KEYS, _safe, aggregate, clean_metric, find_records, load_records, records_frame
from benchmarks.leaderboard_plots import PLOTS, defence_order, defence_styles, main_setting, write_plots
from common.checkpoint import atomic_write_text
from common.environment import git_commit

ASSETS = Path(__file__).with_name("site_assets")
PAPER = Path(__file__).with_name("paper_table1_cifar10.json")
METRIC_MEANING = {"C-ACC": "accuracy on the clean test set", "mAP@0.5": "mAP@0.5 on clean test images",
                  "BLEU": "corpus BLEU on the clean test set"}
FILTERS = ("model", "scale", "attack", "defense", "budget")
SETTING = ["model", "scale", "budget"]


def _pct(v: Any, digits: int = 1) -> str:
    return "-" if v is None or pd.isna(v) else f"{100 * v:.{digits}f}"


def _pm(mean: Any, std: Any) -> str:
    return _pct(mean) if pd.isna(std) else f"{_pct(mean)} ± {_pct(std)}"


def _num(v: Any) -> str:
    return "" if v is None or pd.isna(v) else f"{float(v):.6g}"


def _secs(v: Any) -> str:
    return "-" if v is None or pd.isna(v) else f"{v:.3g}"


def _td(text: str, value: Any = None, cls: str = "num") -> str:
    v = "" if value is None else f' data-v="{escape(str(value))}"'
    return f'<td class="{cls}"{v}>{escape(text)}</td>'


# --------------------------------------------------------------------------------------------------------------
# What reproduces a run.


def _arg(value: Any) -> str:
    """A value as ``--set``/``--attack-param`` read it (YAML): itself when YAML reads it back unchanged, else JSON."""
    import yaml

    text = value if isinstance(value, str) else json.dumps(value)
    return text if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)


def _attack_options(attack: dict[str, Any]) -> dict[str, Any]:
    """The attack's options that differ from its registered defaults (all of them for an attack unknown here)."""
    from attacks import ATTACKS
    from tasks.base import UnknownNameError

    options = {k: v for k, v in attack.items() if k not in ("name", "seed")}
    try:
        cls = ATTACKS.get(attack["name"])
    except UnknownNameError:
        return options
    defaults = {f.name: f.default if f.default is not MISSING else
                f.default_factory() if f.default_factory is not MISSING else MISSING for f in fields(cls)}
    return {k: v for k, v in options.items() if defaults.get(k, MISSING) != v}


def reproduce_command(config: dict[str, Any]) -> str:
    """The ``nftbench run`` command whose resolved config, hence run id, is the record's (datasets under
    ``$DATA_ROOT``, the CLI's default)."""
    task = config["task"]
    args = ["nftbench", "run", "--task", task["task"], "--dataset", task["dataset"]]
    if task.get("model"):
        args += ["--model", task["model"]]
    for k, v in sorted((task.get("model_kwargs") or {}).items()):
        args += ["--model-param", f"{k}={_arg(v)}"]
    if task.get("scale"):
        args += ["--scale", task["scale"]]
    attack = config.get("attack")
    args += ["--attack", attack["name"] if attack else "none"]
    for k, v in sorted(_attack_options(attack).items() if attack else []):
        args += ["--attack-param", f"{k}={_arg(v)}"]
    args += ["--defense", config["defense"]]
    for k, v in sorted((config.get("defense_params") or {}).items()):
        args += ["--set", f"{k}={_arg(v)}"]
    budget = str(config["budget"])
    args += ["--per-class", budget.split("/")[0]] if budget.endswith("/class") else ["--val-frac", budget]
    return shlex.join(args + ["--seed", str(config["seed"])])


# --------------------------------------------------------------------------------------------------------------
# Paper numbers, rankings, heat maps.


def load_paper(path: Path = PAPER) -> dict[str, Any]:
    return json.loads(path.read_text())


def paper_cell(paper: dict[str, Any], task: str, dataset: str, attack: str, defense: str, budget: str) -> dict | None:
    if (task, dataset, budget) != (paper["task"], paper["dataset"], paper["budget"]):
        return None
    return next((c for c in paper["cells"] if (c["attack"], c["defense"]) == (attack, defense)), None)


def settings(agg: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(model, scale, budget) settings with two defences or more, the main setting first, then by cell count."""
    done = agg[(agg["n_seeds"] > 0) & (agg["defense_name"] != "none")]
    counts = done.groupby(SETTING, sort=True)["defense"].agg(["nunique", "size"])
    counts = counts[counts["nunique"] >= 2].sort_values("size", ascending=False, kind="stable")
    main = main_setting(agg)
    return sorted(counts.index, key=lambda s: s != main)


def ranking(agg: pd.DataFrame, df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """One setting's defences ranked by mean DER over the attacks most defences ran on (every ranked defence ran
    on each), with the spread over seeds (std and range of the per-seed mean DER); also those attacks and the
    defences left out for running on others."""
    cells = agg[(agg["n_seeds"] > 0) & (agg["defense_name"] != "none") & agg["der_mean"].notna()]
    covered = cells.groupby("attack")["defense"].nunique()
    attacks = sorted(covered.index[covered == covered.max()]) if len(covered) else []
    per_defence = cells.groupby("defense")["attack"].agg(set)
    ranked = [d for d, a in per_defence.items() if set(attacks) <= a]
    rows = []
    for d in ranked:
        c = cells[(cells["defense"] == d) & cells["attack"].isin(attacks)]
        runs = df[(df["defense"] == d) & df["attack"].isin(attacks) & (df["status"] == "ok")]
        by_seed = runs.groupby("seed").agg(der=("der", "mean"), n=("attack", "nunique"))
        seeds = by_seed[by_seed["n"] == len(attacks)]["der"]  # seeds that ran every attack
        rows.append({"defense": d, "der": c["der_mean"].mean(), "der_seed_std": seeds.std(ddof=1),
                     "der_seed_min": seeds.min(), "der_seed_max": seeds.max(), "n_seeds": len(seeds),
                     "asr_drop": (c["asr_before"] - c["asr_mean"]).mean(),
                     "clean_drop": (c["clean_acc_before"] - c["clean_acc_mean"]).mean(),
                     "asr": c["asr_mean"].mean(), "time_vs_nft": c["time_vs_nft_median"].median()})
    table = pd.DataFrame(rows, columns=["defense", "der", "der_seed_std", "der_seed_min", "der_seed_max", "n_seeds",
                                        "asr_drop", "clean_drop", "asr", "time_vs_nft"])
    table = table.sort_values(["der", "defense"], ascending=[False, True]).reset_index(drop=True)
    return table, attacks, sorted(set(per_defence.index) - set(ranked), key=defence_order)


def ranking_html(table: pd.DataFrame, attacks: list[str], others: list[str], metric: str,
                 paper: dict[str, str] | None) -> str:
    paper_head = f'<th class="num paper">paper: ASR drop / {metric} drop</th>' if paper else ""
    out = [f"<p>Mean over {len(attacks)} attack(s) that every ranked defence ran: {escape(', '.join(attacks))}. "
           "Spread: std and range over the seeds that ran all of them of the per-seed mean DER.</p>",
           '<table class="rank"><thead><tr><th class="num">#</th><th>defence</th><th class="num">mean DER</th>'
           '<th class="num">seed std</th><th class="num">seed range</th><th class="num">seeds</th>'
           f'<th class="num">ASR after</th><th class="num">ASR drop</th><th class="num">{escape(metric)} drop</th>'
           f'<th class="num">x NFT (median)</th>{paper_head}</tr></thead><tbody>']
    for i, r in table.iterrows():
        spread = "-" if r["n_seeds"] < 2 else f"{_pct(r['der_seed_min'])}-{_pct(r['der_seed_max'])}"
        cells = [str(i + 1), r["defense"], _pct(r["der"]), _pct(r["der_seed_std"]), spread, str(r["n_seeds"]),
                 _pct(r["asr"]), _pct(r["asr_drop"]), _pct(r["clean_drop"]),
                 "-" if pd.isna(r["time_vs_nft"]) else f"{r['time_vs_nft']:.2g}"]
        row = "".join(_td(c, cls="" if j == 1 else "num") for j, c in enumerate(cells))
        if paper:
            row += _td(paper.get(r["defense"], "-"), cls="num paper")
        out.append(f"<tr>{row}</tr>")
    out.append("</tbody></table>")
    if others:
        out.append(f"<p class='meta'>Not ranked (ran on other attacks): {escape(', '.join(others))}.</p>")
    return "\n".join(out)


def _heat(value: float, rgb: tuple[int, int, int]) -> str:
    alpha = min(1.0, max(0.0, value))
    return f"background: rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha * 0.85:.2f})"


def heatmap_html(agg: pd.DataFrame, keys: dict[int, str], what: str, metric: str) -> str:
    """Attack x defence: ASR after (red: 100%), or the clean-metric drop in points (blue: 20 points or more)."""
    cells = agg[agg["n_seeds"] > 0]
    attacks = sorted(a for a in cells["attack"].unique() if a != "none")
    defences = sorted(cells["defense"].unique(), key=defence_order)
    title = "ASR after (%)" if what == "asr" else f"{metric} drop (points, before - after)"
    out = [f'<div><h3>{escape(title)}</h3><table class="heat"><thead><tr><th>attack \\ defence</th>']
    out += [f'<th class="col"><span>{escape(d).replace(",", ",<wbr>")}</span></th>' for d in defences]
    out.append("</tr></thead><tbody>")
    index = {(r.attack, r.defense): i for i, r in cells.iterrows()}
    for a in attacks:
        out.append(f"<tr><th>{escape(a)}</th>")
        for d in defences:
            i = index.get((a, d))
            if i is None:
                out.append('<td class="none">·</td>')
                continue
            r = cells.loc[i]
            value = r["asr_mean"] if what == "asr" else r["clean_acc_before"] - r["clean_acc_mean"]
            if pd.isna(value):
                out.append(f'<td data-key="{keys[i]}" tabindex="0">-</td>')
                continue
            style = _heat(value, (214, 39, 40)) if what == "asr" else _heat(value / 0.2, (31, 119, 180))
            tip = f"{a} / {d}: {100 * value:.1f} ({r['n_seeds']} seed(s)); click for the runs"
            out.append(f'<td data-key="{keys[i]}" tabindex="0" style="{style}" title="{escape(tip)}">'
                       f"{100 * value:.0f}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------------------
# The cell table and each cell's detail.


def table_html(agg: pd.DataFrame, keys: dict[int, str], metric: str, paper: dict[str, Any] | None) -> str:
    heads = [("model", "str"), ("scale", "str"), ("attack", "str"), ("clean data", "num"), ("defence", "str"),
             ("seeds", "num"), (f"{metric} before", "num"), ("ASR before", "num"), (metric, "num"), ("ASR", "num"),
             ("RA", "num"), ("DER", "num"), ("time (s)", "num"), ("x NFT", "num"), ("failed", "num")]
    if paper:
        heads.append((f"paper {metric} / ASR", "str"))
    out = ['<div class="wide"><table id="cells"><thead><tr>']
    out += [f'<th data-type="{t}" title="click to sort">{escape(h)}</th>' for h, t in heads]
    out.append("</tr></thead><tbody>")
    for i, r in agg.iterrows():
        attrs = "".join(f' data-{k}="{escape(str(r[k]))}"' for k in FILTERS)
        cls = ' class="failed"' if r["n_seeds"] == 0 else ""
        clean = r["budget"] + ("" if pd.isna(r["clean_samples"]) else f" ({int(r['clean_samples'])})")
        ratio = r["time_vs_nft_median"] if r["defense_name"] != "none" else None
        cells = [_td(r["model"] or "-", cls=""), _td(r["scale"] or "-", cls=""), _td(r["attack"], cls=""),
                 _td(clean, _num(r["clean_samples"])), _td(r["defense"], cls=""), _td(str(r["n_seeds"]), r["n_seeds"]),
                 _td(_pct(r["clean_acc_before"]), _num(r["clean_acc_before"])),
                 _td(_pct(r["asr_before"]), _num(r["asr_before"]))]
        for m in ("clean_acc", "asr", "ra", "der"):
            cells.append(_td(_pm(r[f"{m}_mean"], r[f"{m}_std"]), _num(r[f"{m}_mean"])))
        cells += [_td(_secs(r["defense_time_s_mean"]), _num(r["defense_time_s_mean"])),
                  _td("-" if ratio is None or pd.isna(ratio) else f"{ratio:.2g}", _num(ratio)),
                  f'<td class="num{" bad" if r["failed"] else ""}" data-v="{r["failed"]}">{r["failed"]}</td>']
        if paper:
            p = paper_cell(paper, r["task"], r["dataset"], r["attack"], r["defense"], r["budget"])
            cells.append(_td(f"{p['clean_acc']:.2f} / {p['asr']:.2f}" if p else "", cls="num paper"))
        out.append(f'<tr data-key="{keys[i]}" tabindex="0"{cls}{attrs}>{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _versions(record: dict[str, Any]) -> str:
    v = record.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in ("nftbench", "git_commit", "torch", "python") if k in v) or "-"


def detail_html(key: str, r: pd.Series, runs: pd.DataFrame, records: dict[str, dict], out: Path, metric: str,
                paper: dict[str, Any] | None) -> str:
    title = f"{r['attack']} / {r['defense']}: {r['model'] or 'default model'}, {r['scale'] or '-'} scale, " \
            f"clean budget {r['budget']}"
    body = [f"<p>{r['n_seeds']} seed(s) finished ({escape(r['seeds'] or '-')}), {r['failed']} failed. "
            f"{escape(metric)} {_pct(r['clean_acc_before'], 2)} → {_pm(r['clean_acc_mean'], r['clean_acc_std'])}; "
            f"ASR {_pct(r['asr_before'], 2)} → {_pm(r['asr_mean'], r['asr_std'])}; "
            f"DER {_pm(r['der_mean'], r['der_std'])} (%, mean ± std over seeds).</p>"]
    if paper:
        body.append(f"<p class='paper'>NFT paper, Table 1 (PreAct-ResNet-18): {escape(metric)} "
                    f"{paper['clean_acc']:.2f}, ASR {paper['asr']:.2f}.</p>")
    first = records[runs["run_id"].iloc[0]]
    resolved = (first.get("defense_info") or {}).get("config")
    body.append(f"<h3>Defence options</h3><p>set by the run: <code>{escape(runs['defense_params'].iloc[0])}</code>"
                f"{'' if resolved else ' (resolved options not recorded)'}</p>")
    if resolved:
        body.append(f"<pre>{escape(json.dumps(resolved, indent=1, default=str))}</pre>")
    body.append(f"<h3>Runs</h3><div class='wide'><table><thead><tr><th>seed</th><th>status</th>"
                f"<th>{escape(metric)} after</th><th>ASR after</th><th>RA after</th><th>DER</th><th>time (s)</th>"
                "<th>x NFT (against)</th><th>victim training (s)</th><th>device</th><th>versions</th><th>finished</th>"
                "<th>record</th></tr></thead><tbody>")
    commands = []
    for _, run in runs.sort_values(["seed", "run_id"]).iterrows():
        record = records[run["run_id"]]
        ratio = "-" if pd.isna(run["time_vs_nft"]) else f"{run['time_vs_nft']:.3g} ({run['nft_reference']})"
        link = Path(os.path.relpath(run["path"], out)).as_posix() if run["path"] else ""
        cells = [_td(_num(run["seed"]) or "-", cls=""), _td(run["status"], cls="" if run["status"] == "ok" else "bad")]
        cells += [_td(_pct(run[c], 2)) for c in ("clean_acc_after", "asr_after", "ra_after", "der")]
        cells += [_td(_secs(run["defense_time_s"])), _td(ratio, cls=""), _td(_secs(record.get("victim_train_time_s"))),
                  _td(str(run["device"] or "-"), cls=""),
                  _td(_versions(record), cls=""), _td(str(record.get("finished") or "-"), cls="")]
        cells.append(f'<td><a href="{escape(link)}">{escape(run["run_id"])}.json</a></td>' if link else _td("-"))
        body.append(f"<tr>{''.join(cells)}</tr>")
        seed = _num(run["seed"])
        commands.append(f"# seed {seed}, run id {run['run_id']}\n{reproduce_command(record['config'])}")
        if run["status"] != "ok":
            commands.append(f"# failed: {str(run['error'] or '(no error message)')[:500]}")
    body.append("</tbody></table></div><h3>Reproduce</h3><p class='meta'>Each command trains (or loads the cached) "
                "victim, runs the defence and writes <code>runs/records/&lt;run id&gt;.json</code>; the run id is the "
                "hash of the resolved config, so an equal id means an equal run.</p>")
    body.append(f"<pre>{escape(chr(10).join(commands))}</pre>")
    return f'<template id="d-{key}" data-title="{escape(title)}">{"".join(body)}</template>'


# --------------------------------------------------------------------------------------------------------------
# Pages.


def _page(title: str, body: str, script: bool) -> str:
    dialog = ('<dialog id="detail"><header><h2></h2><button class="close" type="button">close</button></header>'
              '<div class="body"></div></dialog>' if script else "")
    js = '<script src="site.js"></script>' if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="site.css"></head>\n'
            f"<body>\n{body}\n{dialog}{js}</body></html>\n")


def _filters(agg: pd.DataFrame) -> str:
    out = ['<div class="filters">']
    for k in FILTERS:
        values = sorted(agg[k].astype(str).unique(), key=defence_order if k == "defense" else None)
        options = "".join(f'<option value="{escape(v)}">{escape(v or "(default)")}</option>' for v in values)
        out.append(f'<label>{"defence" if k == "defense" else k}<select data-filter="{k}"><option value="">all'
                   f"</option>{options}</select></label>")
    out.append('<label>text<input id="search" type="search" placeholder="any text in the row"></label>'
               '<span id="count" class="meta"></span></div>')
    return "".join(out)


def dataset_page(task: str, dataset: str, part: pd.DataFrame, agg: pd.DataFrame, records: dict[str, dict],
                 out: Path, plots: dict[str, Path], paper: dict[str, Any], footer: str) -> str:
    metric = clean_metric(task)
    keys = {i: f"c{n}" for n, i in enumerate(agg.index)}
    ours = (task, dataset) == (paper["task"], paper["dataset"])
    n_failed = int((part["status"] != "ok").sum())
    body = ['<nav><a href="index.html">← all tasks and datasets</a></nav>',
            f"<h1>{escape(task)} / {escape(dataset)}</h1>",
            f"<p class='meta'>Clean metric: <b>{escape(metric)}</b> ({METRIC_MEANING.get(metric, 'clean test data')})."
            f" {len(part)} runs, {n_failed} failed, {len(agg)} cells (model, scale, attack, defence, clean budget)."
            f" Numbers in %{' (BLEU in points)' if metric == 'BLEU' else ''}, mean ± std over seeds; click any cell"
            " for its runs, records and the commands that reproduce them.</p>",
            "<h2 id='rankings'>Rankings and heat maps</h2>"]
    for n, setting in enumerate(settings(agg)):
        sub = agg[(agg[SETTING].apply(tuple, axis=1) == setting)]
        table, attacks, others = ranking(sub, part[part[SETTING].apply(tuple, axis=1) == setting])
        averages = {a["defense"]: f"{a['asr_drop']:.2f} / {a['clean_acc_drop']:.2f}" for a in paper["averages"]} \
            if ours and setting[2] == paper["budget"] else None
        model, scale, budget = setting
        body.append(f"<details{' open' if n == 0 else ''}><summary>{escape(model or 'default model')}, "
                    f"{escape(scale or '-')} scale, clean budget {escape(budget)} ({len(sub)} cells)</summary>")
        body.append(ranking_html(table, attacks, others, metric, averages))
        if averages:
            body.append(f"<p class='meta paper'>Paper column: {escape(paper['source'])}; mean over "
                        f"{paper['averages_over_attacks']} attacks, {escape(paper['setting'])}</p>")
        body.append(f'<div class="maps">{heatmap_html(sub, keys, "asr", metric)}'
                    f'{heatmap_html(sub, keys, "drop", metric)}</div></details>')
    body += ["<h2 id='table'>All cells</h2>", _filters(agg),
             table_html(agg, keys, metric, paper if ours else None), "<h2 id='figures'>Figures</h2>"]
    captions = {"asr_vs_acc": "ASR vs clean metric after each defence, per attack (main setting)",
                "runtime": "defence wall time relative to NFT on the same victim, budget and seed",
                "nft_budget": "NFT's ASR vs its clean-data budget"}
    for name in PLOTS:
        body.append(f'<figure><img src="plots/{escape(plots[name].name)}" alt="{escape(captions[name])}" '
                    f'loading="lazy"><figcaption class="meta">{escape(captions[name])}</figcaption></figure>')
    failed = part[part["status"] != "ok"].sort_values(["attack", "defense", "budget", "seed"])
    body.append(f"<h2 id='failed'>Failed runs ({len(failed)})</h2>")
    items = [f"<li>{escape(r.attack)} / {escape(r.defense)} / {escape(r.budget)} seed {_num(r.seed) or '-'} "
             f"[{escape(str(r.status))}] <code>{escape(r.run_id)}</code>: "
             f"{escape(str(r.error or '(no error message)')[:300])}</li>" for r in failed.itertuples()]
    body.append(f"<ul>{''.join(items)}</ul>" if items else "<p>None.</p>")
    runs = {k: g for k, g in part.groupby(GROUP_KEYS, sort=False)}
    for i, r in agg.iterrows():
        p = paper_cell(paper, task, dataset, r["attack"], r["defense"], r["budget"])
        body.append(detail_html(keys[i], r, runs[tuple(r[GROUP_KEYS])], records, out, metric, p))
    body.append(footer)
    return _page(f"nftbench: {task} / {dataset}", "\n".join(body), script=True)


def index_page(df: pd.DataFrame, pages: dict[tuple[str, str], tuple[Path, pd.DataFrame]], notes: list[str],
               paper: dict[str, Any], footer: str, generated: str) -> str:
    n_failed = int((df["status"] != "ok").sum()) if len(df) else 0
    body = ["<h1>nftbench leaderboard</h1>",
            f"<p class='meta'>{generated}; {len(df)} run records, {n_failed} failed.</p>",
            "<p>Backdoor purification on every task the suite runs: each page ranks the defences by mean DER "
            "(Defense Effectiveness Rating: ASR removed, clean metric kept), maps attack × defence, lists every "
            "cell with the records and commands behind it, and shows NFT's paper numbers beside ours where the paper "
            "reports the cell (CIFAR-10, Table 1).</p>",
            "<table><thead><tr><th>task</th><th>dataset</th><th>clean metric</th><th class='num'>runs</th>"
            "<th class='num'>failed</th><th class='num'>models</th><th class='num'>attacks</th>"
            "<th class='num'>defences</th><th>top mean DER (main setting)</th></tr></thead><tbody>"]
    for (task, dataset), (path, agg) in pages.items():
        part = df[(df["task"] == task) & (df["dataset"] == dataset)]
        top = "-"
        tops = settings(agg)
        if tops:
            setting = tops[0]
            table, _, _ = ranking(agg[agg[SETTING].apply(tuple, axis=1) == setting],
                                  part[part[SETTING].apply(tuple, axis=1) == setting])
            top = "-" if table.empty else f"{table['defense'].iloc[0]} ({_pct(table['der'].iloc[0])})"
        failed = int((part["status"] != "ok").sum())
        body.append(f"<tr><td><a href='{escape(path.name)}'>{escape(task)}</a></td><td><a href='{escape(path.name)}'>"
                    f"{escape(dataset)}</a></td><td>{escape(clean_metric(task))}</td>{_td(str(len(part)))}"
                    f"<td class='num{' bad' if failed else ''}'>{failed}</td>{_td(str(part['model'].nunique()))}"
                    f"{_td(str(part['attack'].nunique()))}{_td(str(part['defense'].nunique()))}"
                    f"<td>{escape(top)}</td></tr>")
    body.append("</tbody></table>")
    if notes:
        body.append(f"<h2>Files skipped ({len(notes)})</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes)
                    + "</ul>")
    body.append(f"<p class='meta paper'>Paper numbers: {escape(paper['source'])}.</p>{footer}")
    return _page("nftbench leaderboard", "\n".join(body), script=False)


def build_site(roots: list[str | Path], out: str | Path, command: str | None = None) -> dict[str, Any]:
    """Write the site for every record under ``roots`` into ``out``; returns what was written and skipped."""
    out = Path(out)
    records, notes = load_records(find_records(roots))
    df, bad = records_frame(records)
    notes += bad
    by_id = {r["run_id"]: r for r in records}
    command = command or "nftbench leaderboard " + " ".join(shlex.quote(str(r)) for r in roots) + \
        f" --html --out {shlex.quote(str(out))}"
    commit = git_commit()
    generated = f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC" + (f" at commit {commit}" * bool(commit))
    footer = f"<footer class='meta'><p>{generated}. Regenerate: <code>{escape(command)}</code></p></footer>"
    paper = load_paper()
    styles = defence_styles(df["defense"]) if len(df) else {}
    written: dict[str, Any] = {"pages": [], "plots": [], "records": len(df), "notes": notes,
                               "failed": int((df["status"] != "ok").sum()) if len(df) else 0}
    pages = {}
    for (task, dataset), part in ([] if df.empty else df.groupby(["task", "dataset"], sort=True)):
        agg = aggregate(part)
        stem = f"{_safe(task)}_{_safe(dataset)}"
        plots = write_plots(part, agg, f"{task}/{dataset}", clean_metric(task), out / "plots" / stem, styles)
        page = out / f"{stem}.html"
        atomic_write_text(page, dataset_page(task, dataset, part, agg, by_id, out, plots, paper, footer))
        pages[(task, dataset)] = (page, agg)
        written["pages"].append(page)
        written["plots"] += list(plots.values())
    out.mkdir(parents=True, exist_ok=True)
    for asset in ("site.css", "site.js"):  # shared by every page
        atomic_write_text(out / asset, (ASSETS / asset).read_text())
    atomic_write_text(out / "index.html", index_page(df, pages, notes, paper, footer, generated))
    written["index"] = out / "index.html"
    return written
