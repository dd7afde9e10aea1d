"""Planning a sweep: each cell of the grid resolved to its run config and run id (done, reusable from another
sweep's folder, to run, or unresolved), ``--only`` filters, and the ESTIMATE of a dry run (``COST_TABLE``).

A cell whose record ``<out>/records/<run_id>.json`` exists with ``status: ok`` is done and is skipped; so is one
whose ``ok`` record sits in a ``--reuse`` folder (another sweep's output: the run id is the hash of the whole resolved
config, so equal ids are equal runs). A cell whose task cannot be built (say its dataset is missing) gets a stable id
from its ``RunConfig`` and is recorded as an error; datasets listed under ``optional_datasets`` are skipped instead
when absent. Planning also finds what needs the data (an attack ``target`` the dataset has no class for).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.grid import SweepConfigError, expand
from benchmarks.records import params_label
from benchmarks.run import Paths, RunConfig, run_config
from benchmarks.validate import attack_class_problems
from common.hashing import config_hash
from common.precision import precision_identity


@dataclass
class Cell:
    """One cell of a sweep: its ``RunConfig``, run id and resolved config; ``status`` done | reuse (an ``ok``
    record of the same run id in another sweep's folder, ``source``) | todo | unresolved."""

    cfg: RunConfig
    run_id: str
    config: dict[str, Any]
    victim_id: str | None = None
    victim_cached: bool = False
    status: str = "todo"
    error: str | None = None
    source: Path | None = None

    def label(self) -> str:
        c = self.config
        attack = params_label((c.get("attack") or {}).get("name", "none"), self.cfg.attack_params)
        defense = params_label(c["defense"], self.cfg.defense_params)
        return (f"{c['task']['task']} {c['task']['dataset']} {c['task'].get('model') or '-'} {attack} "
                f"{defense} clean={c['budget']} seed={c['seed']}")


@dataclass
class Plan:
    name: str
    description: str
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    duplicates: int = 0

    def todo(self) -> list[Cell]:
        return [c for c in self.cells if c.status not in ("done", "reuse", "other")]


ONLY_KEYS = ("task", "dataset", "model", "attack", "defense", "seed", "budget")


def parse_only(items: Sequence[str]) -> dict[str, set[str]]:
    """``--only KEY=V1,V2`` items -> {key: {values}}; cells must match every key (any of its values). A model or
    defence value is a name (every variant) or a label with options, as the leaderboard writes it
    (``preact-resnet18[width=0.25]``, ``nft[mixup=False]``)."""
    only: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in ONLY_KEYS or not values.strip():
            raise ValueError(f"--only expects KEY=VALUE[,VALUE...] with KEY one of {', '.join(ONLY_KEYS)} "
                             f"(e.g. --only attack=badnets --only seed=2), got {item!r}")
        only.setdefault(key, set()).update(v.strip() for v in split_outside_brackets(values) if v.strip())
    return only


def split_outside_brackets(text: str) -> list[str]:
    """``a,b[x=1,y=2]`` -> ``['a', 'b[x=1,y=2]']``: commas inside a label's options do not separate values."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def select_cells(plan: Plan, only: dict[str, set[str]]) -> int:
    """Mark the cells outside ``only`` as ``other`` (left to another invocation: not run, not copied, still in
    the folder's CSV when their records exist). Returns how many were left out; a value that matches no cell of
    the grid is an error, since it is most likely a typo."""
    def names(c: Cell, key: str) -> set[str]:  # a model or defence matches by name or by its label with options
        if key == "budget":  # 0.01 or 1/class
            return {f"{c.cfg.per_class}/class" if c.cfg.per_class is not None else f"{c.cfg.val_frac:g}"}
        v = str(getattr(c.cfg, key) if getattr(c.cfg, key) is not None else "none")
        return {v, params_label(v, {"model": c.cfg.model_kwargs, "defense": c.cfg.defense_params}.get(key) or {})}

    for key, values in only.items():
        known = set().union(*(names(c, key) for c in plan.cells))
        if values - known:
            raise ValueError(f"--only {key}={','.join(sorted(values - known))} matches no cell of {plan.name}; "
                             f"its {key} values are {', '.join(sorted(known))}")
    left = 0
    for c in plan.cells:
        if not all(names(c, k) & vs for k, vs in only.items()) and c.status != "done":
            c.status, left = "other", left + 1
    return left


def unresolved_config(cfg: RunConfig) -> dict[str, Any]:
    """A record config for a cell whose task could not be built (same shape as ``run_config``'s)."""
    return {
        "task": {"task": cfg.task, "dataset": cfg.dataset, "model": cfg.model, "scale": cfg.scale,
                 "model_kwargs": cfg.model_kwargs},
        "attack": {"name": cfg.attack, **cfg.attack_params} if cfg.attack else None,
        "defense": cfg.defense, "defense_params": cfg.defense_params, "budget": cfg.budget().describe(),
        "seed": cfg.seed, **precision_identity(),
    }


def unresolved_run_id(cfg: RunConfig) -> str:
    """Stable id of a cell that could not be resolved: the hash of its ``RunConfig`` (and an explicit precision, as
    every run id)."""
    return config_hash({"unresolved_cell": asdict(cfg), **precision_identity()})


def record_status(records_dir: Path, run_id: str) -> str | None:
    p = records_dir / f"{run_id}.json"
    try:
        return json.loads(p.read_text()).get("status")
    except (OSError, ValueError):
        return None


def plan_sweep(grid: dict[str, Any], out: Path, paths: Paths, log: Callable[[str], None] = print,
               reuse: Sequence[Path] = ()) -> Plan:
    """Resolve every cell (run id, victim id, done, reusable from a folder of ``reuse`` or not). Tasks are built
    once per (task, dataset, model) on the CPU: the data fingerprint is part of each hash, so this reads (and on
    first use decodes) each dataset."""
    from attacks import create_attack
    from tasks import create_task
    from training.victims import victim_config, victim_dir

    cfgs = expand(grid)
    optional = set(grid.get("optional_datasets") or [])
    records = out / "records"
    tasks: dict[str, Any] = {}
    missing_optional: dict[str, str] = {}
    cells: list[Cell] = []
    seen: set[str] = set()
    duplicates = 0
    problems: list[str] = []  # found only once the data is loaded (a target class the dataset lacks)
    for cfg in cfgs:
        if cfg.dataset in missing_optional:
            continue
        key = json.dumps([cfg.task, cfg.dataset, cfg.model, cfg.model_kwargs, cfg.scale], sort_keys=True, default=str)
        if key not in tasks:
            try:
                tasks[key] = create_task(cfg.task, dataset=cfg.dataset, model=cfg.model, model_kwargs=cfg.model_kwargs,
                                         scale=cfg.scale, data_root=paths.data_root, cache_dir=paths.runs_dir,
                                         device="cpu", download=paths.download)
            except Exception as e:  # noqa: BLE001  (recorded per cell below)
                if cfg.dataset in optional and isinstance(e, FileNotFoundError):
                    missing_optional[cfg.dataset] = str(e)
                    log(f"note: optional dataset {cfg.dataset} skipped: {e}")
                    continue
                tasks[key] = e
        task = tasks[key]
        if isinstance(task, Exception):
            cell = Cell(cfg, unresolved_run_id(cfg), unresolved_config(cfg), status="unresolved",
                        error=f"{type(task).__name__}: {task}")
        else:
            attack = create_attack(cfg.attack, seed=cfg.seed, **cfg.attack_params) if cfg.attack else None
            problems += [f"{cfg.dataset}: {p}" for p in attack_class_problems(task, attack)]
            config = run_config(task, attack, cfg.defense, cfg.defense_params, cfg.budget(), cfg.seed)
            vd = victim_dir(paths.runs_dir, victim_config(task, attack, cfg.seed))
            cell = Cell(cfg, config_hash(config), config, victim_id=vd.name,
                        victim_cached=(vd / "victim.json").is_file() and (vd / "model.safetensors").is_file())
        if cell.run_id in seen:
            duplicates += 1
            continue
        seen.add(cell.run_id)
        if record_status(records, cell.run_id) == "ok":
            cell.status = "done"
        elif cell.status == "todo":
            cell.source = next((Path(r) / "records" / f"{cell.run_id}.json" for r in reuse
                                if record_status(Path(r) / "records", cell.run_id) == "ok"), None)
            cell.status = "reuse" if cell.source else cell.status
        cells.append(cell)
    tasks.clear()
    if problems:
        problems = list(dict.fromkeys(problems))
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SweepConfigError(f"{grid.get('_source', 'sweep')}: {len(problems)} problem(s); fix them and run again "
                               f"(nothing was run):\n{lines}")
    notes = [f"optional dataset {d} not found, skipped" for d in missing_optional]
    return Plan(grid.get("name", "sweep"), str(grid.get("description") or "").strip(), cells, notes, duplicates)


# --------------------------------------------------------------------------------------------------- estimate
# Rough wall-clock cost in seconds of one victim and of one defence run, per (dataset, scale) and device kind, for
# `nftbench sweep --dry-run`'s ESTIMATE. "cpu": one thread of the 2-core development box. Entries marked "measured"
# are medians of that box's own records (victim.json train_time_s; a NFT run from its record's start to finish,
# evaluation included), with their dates; the others are scaled from them by images x epochs. "gpu": one
# H100/H200-class GPU with bf16 autocast, NOT measured (no GPU was available; PreAct-ResNet-18 assumed at ~5 s per
# CIFAR-10 epoch): `make gpu-check` measures it. DEFENSE_COST_FACTOR scales a defence run per defence (NFT = 1).
COST_TABLE: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    # (dataset, scale): {"cpu": (victim_s, defence_s), "gpu": (victim_s, defence_s)}
    ("digits", "quick"): {"cpu": (8, 18), "gpu": (15, 5)},  # measured 2026-11-29: 9 victims, 121 NFT runs
    ("digits", "paper"): {"cpu": (150, 20), "gpu": (25, 5)},
    ("cifar10", "quick"): {"cpu": (1100, 140), "gpu": (60, 10)},  # measured 2026-11-28/29: 21 victims, 184 NFT runs
    # airbench, cpu: the victim measured by the lead (issue 20: ~30 min at ~460 images/s); NFT measured 2026-12-06:
    # 0.135 s of CPU per step (1000 steps) + ~8 s per evaluation. gtsrb: CIFAR-10's victim x 37k / 47.5k images
    ("cifar10", "fast"): {"cpu": (1800, 150), "gpu": (30, 10)},
    ("gtsrb", "fast"): {"cpu": (1400, 150), "gpu": (25, 10)},
    ("cifar10", "paper"): {"cpu": (200_000, 3000), "gpu": (500, 20)},
    ("gtsrb", "quick"): {"cpu": (3000, 240), "gpu": (50, 10)},
    ("gtsrb", "paper"): {"cpu": (160_000, 3000), "gpu": (400, 20)},
    ("tiny-imagenet", "quick"): {"cpu": (20_000, 900), "gpu": (300, 30)},
    ("tiny-imagenet", "paper"): {"cpu": (800_000, 12_000), "gpu": (2000, 60)},
    ("imagenet", "quick"): {"cpu": (2_000_000, 50_000), "gpu": (15_000, 300)},
    ("imagenet", "paper"): {"cpu": (20_000_000, 50_000), "gpu": (150_000, 300)},
    # point clouds (tasks/point_cloud.py). procedural quick measured on the 2-core box (victim ~25 s, NFT's default
    # 1,000 steps of 128 ~3-6 min); ModelNet includes the one-time mesh decode; GPU numbers are guesses (PointNet
    # with T-Nets, 1024 points, ~10 ms per step of 32: 250 epochs of ModelNet40 = 73k steps)
    ("procedural", "quick"): {"cpu": (20, 23), "gpu": (10, 10)},  # measured 2026-11-28: 6 victims, 6 NFT runs
    ("procedural", "paper"): {"cpu": (30_000, 6000), "gpu": (150, 20)},
    ("modelnet10", "quick"): {"cpu": (400, 300), "gpu": (40, 10)},
    ("modelnet10", "paper"): {"cpu": (800_000, 6000), "gpu": (400, 30)},
    ("modelnet40", "quick"): {"cpu": (900, 300), "gpu": (60, 10)},
    ("modelnet40", "paper"): {"cpu": (2_000_000, 6000), "gpu": (900, 30)},
    ("multi30k", "quick"): {"cpu": (2400, 560), "gpu": (120, 30)},  # cpu measured 2026-11-29: 1 victim, 1 NFT run
}
# Trainings an attack causes besides its victim (``extra_trainings``): the task's clean model (Trojan, CLB and LF
# optimise their trigger against it; shared by them, and the benign victim of the same seed when the grid has one),
# PCBA's surrogate (the recipe on ``surrogate_samples`` clouds: a victim x that share of the training set) and the
# trigger networks ISSBA and FBA train (their steps x a victim step's cost, as if a step cost the same; where the
# training set's size is not listed, one victim).
CLEAN_MODEL_ATTACKS = ("trojan", "clb", "lf")
TRIGGER_NETWORK_STEPS = {"issba": ("encoder_steps", 3000), "fba": ("style_steps", 1000)}
TRAIN_SAMPLES = {"modelnet40": 9843, "modelnet10": 3991, "cifar10": 50000, "gtsrb": 39209, "tiny-imagenet": 100000}
DEFAULT_COST = {"quick": {"cpu": (3600, 240), "gpu": (60, 10)}, "paper": {"cpu": (200_000, 3000), "gpu": (500, 20)}}
# Newer defences: their time / NFT's time measured on the CIFAR-10 quick victims (results/cifar10-quick).
DEFENSE_COST_FACTOR = {"none": 0.05, "nft": 1.0, "ft": 1.0, "fine-pruning": 1.5, "anp": 3.0, "i-bau": 2.0,
                       "clp": 0.1, "ft-sam": 3.4, "fst": 0.1, "nad": 0.2, "rnp": 0.2, "awm": 1.5, "sau": 7.6}


def device_kind(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        return "gpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def victim_key(c: Cell) -> str:
    """The victim id, or for an unresolved cell a stand-in built from what determines its victim."""
    if c.victim_id:
        return c.victim_id
    cfg = c.cfg
    return config_hash({"unresolved_victim": [cfg.task, cfg.dataset, cfg.model, cfg.model_kwargs, cfg.scale,
                                              cfg.attack, cfg.attack_params, cfg.seed]})


def estimate(plan: Plan, kind: str, workers: int) -> dict[str, Any]:
    """Victims to train vs cached, defence runs, and an ESTIMATED time from ``COST_TABLE`` (not a measurement).
    Unresolved cells (data not found here) are costed as if their data were present."""
    todo = [c for c in plan.cells if c.status in ("todo", "unresolved")]
    victims_all = {victim_key(c) for c in plan.cells}
    train = {victim_key(c): c for c in todo if not c.victim_cached}
    extra = extra_trainings(plan, list(train.values()))
    seconds = 0.0
    for c in train.values():
        cost = COST_TABLE.get((c.cfg.dataset, c.cfg.scale)) or DEFAULT_COST.get(c.cfg.scale, DEFAULT_COST["quick"])
        seconds += cost[kind][0]
    for kind_of, cells in extra.items():
        for c in cells.values():
            cost = COST_TABLE.get((c.cfg.dataset, c.cfg.scale)) or DEFAULT_COST.get(c.cfg.scale, DEFAULT_COST["quick"])
            seconds += cost[kind][0] * extra_share(kind_of, c)
    for c in todo:
        cost = COST_TABLE.get((c.cfg.dataset, c.cfg.scale)) or DEFAULT_COST.get(c.cfg.scale, DEFAULT_COST["quick"])
        seconds += cost[kind][1] * DEFENSE_COST_FACTOR.get(c.cfg.defense, 1.0)
    return {
        "cells": len(plan.cells), "done": sum(c.status == "done" for c in plan.cells),
        "reuse": sum(c.status == "reuse" for c in plan.cells),
        "to_run": sum(c.status == "todo" for c in plan.cells),
        "unresolved": sum(c.status == "unresolved" for c in plan.cells),
        "victims": len(victims_all), "victims_to_train": len(train),
        "victims_unresolved": len({victim_key(c) for c in plan.cells if c.status == "unresolved"}),
        "victims_cached": len({c.victim_id for c in plan.cells if c.victim_id and c.victim_cached}),
        "defense_runs": sum(c.cfg.defense != "none" for c in todo),
        **{f"{k}_to_train": len(v) for k, v in extra.items()},
        "estimated_s": seconds / max(1, workers),
        "device": kind, "workers": workers,
    }


def extra_trainings(plan: Plan, training: list[Cell]) -> dict[str, dict[str, Cell]]:
    """The trainings besides victims that the cells of ``training`` (victims to train) cause, one cell standing for
    each: clean models (not counted where the grid has the benign victim they are), surrogates, trigger networks."""
    cfg_key = lambda c, *more: config_hash([c.cfg.task, c.cfg.dataset, c.cfg.model, c.cfg.model_kwargs,  # noqa: E731
                                            c.cfg.scale, *more])
    benign = {cfg_key(c, c.cfg.seed) for c in plan.cells if c.cfg.attack is None}
    out: dict[str, dict[str, Cell]] = {"clean_models": {}, "surrogates": {}, "trigger_networks": {}}
    for c in training:
        if c.cfg.attack in CLEAN_MODEL_ATTACKS and cfg_key(c, c.cfg.seed) not in benign:
            out["clean_models"].setdefault(cfg_key(c, c.cfg.seed), c)
        elif c.cfg.attack == "pcba":
            out["surrogates"].setdefault(cfg_key(c, c.cfg.seed, c.cfg.attack_params), c)
        elif c.cfg.attack in TRIGGER_NETWORK_STEPS:
            out["trigger_networks"].setdefault(cfg_key(c, c.cfg.seed, c.cfg.attack, c.cfg.attack_params), c)
    return out


def extra_share(kind_of: str, c: Cell) -> float:
    """An extra training's cost as a share of the cell's victim's (see ``CLEAN_MODEL_ATTACKS``)."""
    n = TRAIN_SAMPLES.get(c.cfg.dataset)
    if kind_of == "clean_models" or n is None:
        return 1.0
    if kind_of == "surrogates":
        return min(1.0, c.cfg.attack_params.get("surrogate_samples", 1000) / n)
    from tasks.image_classification import DATASET_RECIPES, RECIPES

    recipe = {**RECIPES.get(c.cfg.scale, RECIPES["quick"]), **DATASET_RECIPES.get((c.cfg.dataset, c.cfg.scale), {})}
    field_name, default = TRIGGER_NETWORK_STEPS[c.cfg.attack]
    return min(1.0, c.cfg.attack_params.get(field_name, default) / (recipe["epochs"] * n // recipe["batch_size"]))


def human_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def describe_plan(plan: Plan, est: dict[str, Any]) -> str:
    lines = [f"sweep {plan.name}: {len(plan.cells)} cells"]
    errors: dict[str, int] = {}
    for c in plan.cells:
        victim = f"victim {c.victim_id} ({'cached' if c.victim_cached else 'train'})" if c.victim_id else ""
        status = "error" if c.status == "unresolved" else c.status
        if c.status == "unresolved":
            errors[c.error or ""] = errors.get(c.error or "", 0) + 1
        lines.append(f"{c.run_id}  {status:<5}  {c.label()}  {victim}".rstrip())
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"error ({n} cells): {e}" for e, n in errors.items()]
    if plan.duplicates:
        lines.append(f"note: {plan.duplicates} duplicate cell(s) of the grid dropped (same run id)")
    lines.append(
        f"{est['cells']} cells: {est['done']} done (skipped), {est['reuse']} copied from --reuse folders, "
        f"{est['to_run']} to run, {est['unresolved']} that cannot "
        f"be resolved here (recorded as errors); victims: {est['victims']} ({est['victims_to_train']} to train, "
        f"{est['victims_cached']} cached); defence runs: {est['defense_runs']} (+ 'none' baselines); also to train: "
        f"{est['clean_models_to_train']} clean model(s), {est['surrogates_to_train']} surrogate(s), "
        f"{est['trigger_networks_to_train']} trigger network(s)"
    )
    extra = " (unresolved cells counted as if their data were present)" if est["unresolved"] else ""
    lines.append(f"estimated time: ~{human_time(est['estimated_s'])} on {est['workers']} {est['device'].upper()} "
                 f"worker(s){extra}; an ESTIMATE from the per-scale cost table in benchmarks/plan.py "
                 "(COST_TABLE), not a measurement")
    return "\n".join(lines)

