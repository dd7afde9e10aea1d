"""Sweeps: a YAML grid of cells (tasks x datasets x models x attacks x defences x clean budgets x seeds).

A sweep is planned, validated and then executed:

1. **Load and validate** (``load_sweep`` + ``expand``): unknown keys, unknown names, options that do not exist,
   values of the wrong type or range (``nft: {steps: -1}``, ``mixup: maybe``, ``poison_rate: 2``, a model
   ``width: -1``), attacks or budgets the task cannot take (``benchmarks.validate``) and a ``name`` that is not a
   plain folder name are collected into one :class:`SweepConfigError` that names each fix, before any work
   starts; planning adds what needs the data (an attack ``target`` the dataset has no class for).
2. **Plan** (``plan_sweep``): each cell is resolved to its run config (``benchmarks.run.run_config``) and its
   run id, the hash of that config. A cell whose record ``<out>/records/<run_id>.json`` exists with
   ``status: ok`` is done and is skipped; so is one whose ``ok`` record sits in a ``--reuse`` folder (another
   sweep's output: the run id is the hash of the whole resolved config, so equal ids are equal runs), copied
   in with a ``copied_from`` field. A cell whose task cannot be built (say its dataset is missing) gets
   a stable id from its ``RunConfig`` and an error record; datasets listed under ``optional_datasets`` are
   skipped instead when absent.
3. **Execute**: ``local`` (in-process, or one spawned worker process per visible GPU, each pinned with
   ``CUDA_VISIBLE_DEVICES``) or ``ray`` (one Ray task per cell: ``num_gpus=1`` when the cluster has GPUs,
   ``num_cpus=1`` otherwise). A cell that raises (missing data, NaN, out of memory, a dead worker) becomes a
   record with ``status: error``; the sweep goes on. Victims are shared through the victim cache, which a
   per-victim file lock keeps from being trained twice at once.
4. **Collect**: ``<out>/results.csv`` is rebuilt from the records after every cell and at the end (written
   atomically, one row per record of the folder, errors included: the grid's cells first), then ``<out>/table.md``
   (the grid's cells).

Each cell's stdout, stderr and logging go to ``<out>/logs/<run_id>.log``. A sweep killed at any point
(even SIGKILL) is resumed by running it again: finished cells are skipped, the interrupted one reruns. A cell is
claimed before it runs (``execute_cell``), so sweeps of one grid running at once into one folder run each cell
once, each cell's log holding one process's output.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.interrupts import INTERRUPTED
from benchmarks.records import CSV_COLUMNS, labelled_row, params_label, write_record
from benchmarks.run import Paths, RunConfig, run_config, run_once
from benchmarks.validate import attack_class_problems, attack_problems, budget_problems, model_problems
from common.checkpoint import atomic_write_text
from common.environment import versions
from common.fileio import file_lock
from common.guards import quiet
from common.hashing import config_hash

CONFIG_DIR = Path(__file__).parent / "configs"

# Keys of a sweep file. Singular ``task``/``model`` are the older preset format; both spellings work.
SWEEP_KEYS = {
    "name": "a label for the table and the output folder's name (results/<name>): letters, digits, . _ + = -",
    "description": "free text printed above the table",
    "task": "one task name (default: image)", "tasks": "a list of task names",
    "scale": "quick | fast | paper (default: quick)",
    "model": "one model name",
    "models": "a list of models: names, {name: ..., option: value} (e.g. a width), or null (the dataset's default)",
    "model_params": "{model: {option: value}}: model options (model_kwargs)",
    "datasets": "a list of datasets", "optional_datasets": "datasets skipped (with a note) when not found",
    "data_root": "dataset folder; $VARS are expanded; --data-root overrides it",
    "attacks": "a list of attacks: names ('none' for a benign model) or {name: ..., param: value}",
    "attack_params": "{attack: {param: value}}: parameters of every cell with that attack",
    "defenses": "a list of defences: names or {name: ..., option: value}",
    "defense_params": "{defence: {option: value}}: options of every cell with that defence",
    "budgets": "a list of clean budgets: {val_frac: f} or {per_class: k}",
    "seeds": "a list of seeds (integers >= 0)",
}
REQUIRED = ("datasets", "attacks", "defenses", "budgets", "seeds")

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


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")


class SweepConfigError(ValueError):
    """A sweep file that cannot run as written; the message lists every problem and its fix."""


# --------------------------------------------------------------------------------------------------- loading
def sweep_path(config: str | os.PathLike) -> Path:
    """A YAML path, or the name of a preset in ``benchmarks/configs`` (``quick``, ``paper``, ...)."""
    s = str(config)
    path = Path(s) if s.endswith((".yaml", ".yml")) or os.sep in s else CONFIG_DIR / f"{s}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"sweep config {s!r} not found ({path}); presets: {', '.join(names)}, "
                                "or give the path of a YAML file")
    return path


def load_sweep(config: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep file and validate it completely (every cell), raising one :class:`SweepConfigError`."""
    path = sweep_path(config)
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(grid, dict):
        raise SweepConfigError(f"{path}: expected a mapping of keys ({', '.join(SWEEP_KEYS)}), "
                               f"got {type(grid).__name__}")
    grid = dict(grid)
    grid.setdefault("name", re.sub(r"[^A-Za-z0-9._+=-]", "-", path.stem).lstrip(".-_+=") or "sweep")
    grid["_source"] = str(path)
    expand(grid)  # validates
    return grid


def _as_list(grid: dict[str, Any], key: str, problems: list[str]) -> list[Any]:
    v = grid.get(key)
    if not isinstance(v, list) or not v:
        problems.append(f"{key}: expected a non-empty list, got {v!r}")
        return []
    return v


def named_entry(entry: Any, kind: str, where: str, problems: list[str]) -> tuple[str, dict[str, Any]] | None:
    """``"nft"`` or ``{name: nft, steps: 30}`` -> (name, params)."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}
    problems.append(f"{where}: expected a {kind} name or {{name: ..., option: value}}, got {entry!r}")
    return None


def _params_table(grid: dict[str, Any], key: str, problems: list[str]) -> dict[str, dict[str, Any]]:
    table = grid.get(key) or {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        problems.append(f"{key}: expected {{name: {{option: value}}}}, got {table!r}")
        return {}
    return table


def expand(grid: dict[str, Any]) -> list[RunConfig]:
    """Every cell of ``grid`` as a ``RunConfig``, in victim-major order (all defences and budgets of one victim
    before the next victim). Validates names, options and ranges of every cell; raises one error listing all."""
    from attacks import create_attack
    from defenses import DEFENSES
    from tasks import TASKS, CleanBudget

    source = grid.get("_source", "sweep")
    problems: list[str] = []
    name = grid.get("name", "sweep")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        problems.append(f"name: {name!r} is not a folder name (1-100 letters, digits, . _ + = -, starting with a "
                        "letter or digit): it names the output folder results/<name>, so a path is refused; give a "
                        "plain name, and --out to write elsewhere")
    unknown = sorted(set(grid) - set(SWEEP_KEYS) - {"_source"})
    for k in unknown:
        import difflib

        close = difflib.get_close_matches(k, SWEEP_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(f"unknown key {k!r}: {hint}valid keys: {', '.join(SWEEP_KEYS)}")
    for one, many in (("task", "tasks"), ("model", "models")):
        if one in grid and many in grid:
            problems.append(f"give either {one!r} or {many!r}, not both")
    tasks = grid["tasks"] if "tasks" in grid else [grid.get("task", "image")]
    model_entries = grid["models"] if "models" in grid else [grid.get("model")]
    for key, values in (("tasks", tasks), ("models", model_entries)):
        if not isinstance(values, list) or not values:
            problems.append(f"{key}: expected a non-empty list, got {values!r}")
    tasks = tasks if isinstance(tasks, list) else []
    model_specs: list[tuple[str | None, dict[str, Any]]] = []  # (name or None = the dataset's default, options)
    for i, entry in enumerate(model_entries if isinstance(model_entries, list) else []):
        named = (None, {}) if entry is None else named_entry(entry, "model", f"models[{i}]", problems)
        if named is not None:
            model_specs.append(named)
    models = [name for name, _ in model_specs]
    scale = grid.get("scale", "quick")
    datasets = _as_list(grid, "datasets", problems)
    optional = grid.get("optional_datasets") or []
    if not isinstance(optional, list):
        problems.append(f"optional_datasets: expected a list, got {optional!r}")
        optional = []
    model_params = _params_table(grid, "model_params", problems)
    attack_params = _params_table(grid, "attack_params", problems)
    defense_params = _params_table(grid, "defense_params", problems)

    for t in tasks:
        try:
            TASKS.get(t)
        except KeyError as e:
            problems.append(f"tasks: {e}")
    if "image" in tasks:
        from tasks.image_classification import RECIPES
        from tasks.image_data import IMAGE_DATASETS
        from tasks.image_models import IMAGE_MODELS

        if scale not in RECIPES:
            problems.append(f"scale: must be one of {sorted(RECIPES)}, got {scale!r}")
        for d in [*datasets, *optional]:
            try:
                IMAGE_DATASETS.get(d)
            except KeyError as e:
                problems.append(f"datasets: {e}")
        for m in models:
            if m is not None:
                try:
                    IMAGE_MODELS.get(m)
                except KeyError as e:
                    problems.append(f"models: {e}")

    attacks: list[tuple[str | None, dict[str, Any]]] = []
    attack_names: set[str] = set()
    for i, entry in enumerate(_as_list(grid, "attacks", problems)):
        named = named_entry(entry, "attack", f"attacks[{i}]", problems)
        if named is None:
            continue
        name, params = named
        attack_names.add(name)
        if name == "none":
            attacks.append((None, {}))
            continue
        params = {**attack_params.get(name, {}), **params}
        if "seed" in params:
            problems.append(f"attacks[{i}] ({name}): 'seed' is set per cell by the grid's seeds, remove it")
            continue
        try:
            create_attack(name, seed=0, **params)
        except (KeyError, ValueError, TypeError) as e:
            problems.append(f"attacks[{i}] ({name}): {e}")
            continue
        attacks.append((name, params))
    for name in attack_params:
        if name not in attack_names:
            problems.append(f"attack_params: {name!r} is not one of the grid's attacks; remove it or add the attack")

    defenses: list[tuple[str, dict[str, Any]]] = []
    defense_names: set[str] = set()
    for i, entry in enumerate(_as_list(grid, "defenses", problems)):
        named = named_entry(entry, "defence", f"defenses[{i}]", problems)
        if named is None:
            continue
        name, params = named
        defense_names.add(name)
        params = {**defense_params.get(name, {}), **params}
        try:
            DEFENSES.get(name).make_config(params)
        except (KeyError, ValueError, TypeError) as e:
            problems.append(f"defenses[{i}] ({name}): {e}")
            continue
        defenses.append((name, params))
    for name in defense_params:
        if name not in defense_names:
            problems.append(f"defense_params: {name!r} is not one of the grid's defences; remove it or add the defence")

    budgets: list[dict[str, Any]] = []
    for i, b in enumerate(_as_list(grid, "budgets", problems)):
        if not isinstance(b, dict) or set(b) - {"val_frac", "per_class"} or len(b) != 1:
            problems.append(f"budgets[{i}]: expected {{val_frac: fraction}} or {{per_class: k}}, got {b!r}")
            continue
        try:
            CleanBudget(fraction=b.get("val_frac"), per_class=b.get("per_class"))
        except (ValueError, TypeError) as e:
            problems.append(f"budgets[{i}]: {e}")
            continue
        budgets.append(b)

    seeds = _as_list(grid, "seeds", problems)
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            problems.append(f"seeds: expected integers >= 0, got {s!r}")
    for m in model_params:
        if m not in models:
            problems.append(f"model_params: {m!r} is not one of the grid's models ({models}); remove it or add it")
    problems += fit_problems(tasks, [*datasets, *optional], scale, model_specs, model_params, attacks, budgets)

    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SweepConfigError(f"{source}: {len(problems)} problem(s); fix them and run again (nothing was run):\n"
                               f"{lines}")

    out = []
    for task, dataset, (model, mparams), (attack, aparams), seed, budget, (defense, dparams) in itertools.product(
        tasks, [*datasets, *optional], model_specs, attacks, seeds, budgets, defenses
    ):
        out.append(RunConfig(
            task=task, dataset=dataset, model=model, model_kwargs={**model_params.get(model, {}), **mparams},
            scale=scale,
            attack=attack, attack_params=dict(aparams), defense=defense, defense_params=dict(dparams),
            val_frac=budget.get("val_frac"), per_class=budget.get("per_class"), seed=seed,
        ))
    return out


def fit_problems(tasks: list[str], datasets: list[str], scale: str, model_specs: list[tuple[str | None, dict]],
                 model_params: dict[str, dict], attacks: list[tuple[str | None, dict]], budgets: list[dict]
                 ) -> list[str]:
    """What every task of the grid must accept of its models' options, attacks and budgets (``benchmarks.validate``;
    no data needed), each problem once."""
    from tasks import TASKS, CleanBudget

    problems: list[str] = []
    for task in tasks:
        if task not in TASKS:
            continue
        for dataset, (model, options) in itertools.product(datasets, model_specs):
            kwargs = {**model_params.get(model, {}), **options}
            problems += model_problems(task, dataset, model, scale, kwargs)
        for name, _ in attacks:
            problems += attack_problems(task, name)
        for b in budgets:
            problems += [f"budgets {b}: {p}" for p in budget_problems(
                task, CleanBudget(fraction=b.get("val_frac"), per_class=b.get("per_class")))]
    return list(dict.fromkeys(problems))


def grid_data_root(grid: dict[str, Any], paths: Paths) -> Paths:
    """``--data-root`` wins; else the grid's ``data_root`` with $VARS expanded (unset: the task's default)."""
    if paths.data_root is not None or not grid.get("data_root"):
        return paths
    root = os.path.expanduser(os.path.expandvars(str(grid["data_root"])))
    if "$" in root:  # a variable that is not set: fall back to $DATA_ROOT / ./data as the task does
        return paths
    return Paths(runs_dir=paths.runs_dir, data_root=root, device=paths.device, download=paths.download)


# --------------------------------------------------------------------------------------------------- planning
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
        only.setdefault(key, set()).update(v.strip() for v in values.split(",") if v.strip())
    return only


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
        "seed": cfg.seed,
    }


def unresolved_run_id(cfg: RunConfig) -> str:
    """Stable id of a cell that could not be resolved: the hash of its ``RunConfig``."""
    return config_hash({"unresolved_cell": asdict(cfg)})


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
def device_kind(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        return "gpu"
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _victim_key(c: Cell) -> str:
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
    victims_all = {_victim_key(c) for c in plan.cells}
    train = {_victim_key(c): c for c in todo if not c.victim_cached}
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
        "victims_unresolved": len({_victim_key(c) for c in plan.cells if c.status == "unresolved"}),
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
                 f"worker(s){extra}; an ESTIMATE from the per-scale cost table in benchmarks/sweep.py "
                 "(COST_TABLE), not a measurement")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- one cell
@contextlib.contextmanager
def capture_to(log_path: Path) -> Iterator[None]:
    """Send this cell's stdout, stderr and logging (INFO and up) to ``log_path`` (appended, one header per try)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as f:
        f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()} ===\n")
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(min(level, logging.INFO) if level else logging.NOTSET)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def error_record(cell: Cell, error: str, tb: str | None = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {"run_id": cell.run_id, "status": "error", "config": cell.config, "victim_id": cell.victim_id,
              "error": error, "versions": versions(), "started": now, "finished": now}
    if tb:
        record["traceback"] = tb
    return record


def execute_cell(cell: Cell, paths: Paths, out: Path, wait: bool = True) -> dict[str, Any] | None:
    """Run one cell with its output captured; write and return its record (``status: error`` if it raised).

    The cell is claimed first (an exclusive lock on ``<out>/claims/<run_id>.lock``), so sweeps of one grid running
    at once into one folder run each cell once and never share a log: a cell another process holds is waited for
    (``wait``) or left, returning None. A claim dies with its process (even on SIGKILL), so a killed sweep's cells
    are free again at once. A cell whose ``ok`` record exists when the claim is taken is not run again.
    """
    records = out / "records"
    with file_lock(out / "claims" / f"{cell.run_id}.lock", blocking=wait) as claimed:
        if not claimed:
            return None
        if record_status(records, cell.run_id) == "ok":  # another process ran it since this one planned
            return json.loads((records / f"{cell.run_id}.json").read_text())
        return run_claimed_cell(cell, paths, out)


def run_claimed_cell(cell: Cell, paths: Paths, out: Path) -> dict[str, Any]:
    records = out / "records"
    written = False  # run_once writes the record of a cell it ran; anything else is written below
    with capture_to(out / "logs" / f"{cell.run_id}.log"):
        print(f"cell {cell.run_id}: {cell.label()}")
        if cell.status == "unresolved":
            record = error_record(cell, cell.error or "unresolved")
            print(f"error: {record['error']}")
        else:
            try:
                record = run_once(cell.cfg, paths, results_csv=None, records_dir=records, skip_done=True)
                written = True
            except Exception as e:  # noqa: BLE001  (recorded: a failed cell is a row, never a silent gap)
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt from e
                traceback.print_exc()
                record = error_record(cell, f"{type(e).__name__}: {e}", traceback.format_exc(limit=8))
            if record.get("run_id") != cell.run_id:  # the data changed since planning: keep the planned id too
                print(f"warning: run id {record.get('run_id')} differs from the planned {cell.run_id}")
                record = {**record, "run_id": cell.run_id, "resolved_run_id": record.get("run_id")}
                written = False
            if record.get("status") != "ok":
                print(f"error: {record.get('error')}")
            else:
                after, info = record.get("after") or {}, record.get("defense_info") or {}
                print(f"after: {json.dumps(after)}  der {record.get('der')}  defence {info.get('wall_time_s', 0):.1f}s")
        print(f"status: {record['status']}")
    if not written:
        write_record(records / f"{cell.run_id}.json", record)
    return record


# --------------------------------------------------------------------------------------------------- executors
_WORKER: dict[str, Any] = {"slot": 0, "bar": None}


def _init_worker(slots: Any, gpus: list[str], threads: int, bar_lock: Any) -> None:
    """Runs once in each spawned worker: take a slot, pin its GPU, size its CPU threads, open its progress line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the workers (run_local)
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    tqdm.set_lock(bar_lock)  # the driver's: a worker stopped mid-cell leaves no lock of its own behind
    _WORKER["slot"] = slot
    _WORKER["bar"] = tqdm(desc=f"worker {slot}", position=slot + 1, unit="cell", disable=quiet(), leave=False,
                          file=sys.stderr, dynamic_ncols=True)
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _WORKER["bar"].close, exitpriority=10)  # clear the line when the pool ends


def _worker_cell(cell: Cell, paths: Paths, out: str, wait: bool) -> dict[str, Any] | None:
    bar = _WORKER["bar"]
    if bar is not None:
        bar.set_description_str(f"worker {_WORKER['slot']}: {cell.label()}")
    record = execute_cell(cell, paths, Path(out), wait)
    if bar is not None and record is not None:
        bar.update()
    return record


def _ray_cell(cell: Cell, paths: Paths, out: str, wait: bool) -> tuple[dict[str, Any] | None, str]:
    record = execute_cell(cell, paths, Path(out), wait)
    log = Path(out) / "logs" / f"{cell.run_id}.log"
    return record, log.read_text() if record is not None and log.is_file() else ""


def visible_gpus() -> list[str]:
    """GPU ids a worker can be pinned to: those of ``CUDA_VISIBLE_DEVICES`` if set, else ``0..count-1``."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_workers(workers: int | str | None, device: str) -> int:
    """``auto``: one worker per visible GPU (when the device may be a GPU), else 1."""
    if workers in (None, "auto"):
        return max(1, len(visible_gpus())) if device in ("auto", "cuda") else 1
    n = int(workers)
    if n < 1:
        raise ValueError(f"--workers must be >= 1 or 'auto', got {workers}")
    return n


class Collector:
    """Receives finished records (in the driver) and keeps ``results.csv`` rebuilt from the records."""

    def __init__(self, plan: Plan, out: Path, on_record: Callable[[Cell, dict[str, Any]], None] | None = None):
        self.plan, self.out, self.on_record = plan, out, on_record

    def __call__(self, cell: Cell, record: dict[str, Any]) -> None:
        path = self.out / "records" / f"{cell.run_id}.json"
        try:
            same = json.loads(path.read_text()) == json.loads(json.dumps(record, default=str))
        except (OSError, ValueError):
            same = False
        if not same:  # a worker on another node without a shared file system: write it here
            write_record(path, record)
        cell.status = "done" if record.get("status") == "ok" else "error"
        rebuild_csv(self.out, [c.run_id for c in self.plan.cells])
        if self.on_record:
            self.on_record(cell, record)


def run_local(todo: list[Cell], paths: Paths, out: Path, workers: int, collect: Collector) -> None:
    """In-process and sequential (workers=1), or one spawned worker process per slot, each pinned to a GPU. Cells
    another sweep has claimed are left for last, then waited for (their record is taken as it is)."""
    from tqdm.auto import tqdm

    if not todo:
        return
    workers = min(workers, len(todo))
    if workers == 1:
        bar = tqdm(total=len(todo), desc="worker 0", position=0, unit="cell", disable=quiet(), dynamic_ncols=True)
        claimed_elsewhere = []
        for wait, cells in ((False, todo), (True, claimed_elsewhere)):
            for cell in cells:
                bar.set_description_str(f"worker 0: {cell.label()}")
                record = execute_cell(cell, paths, out, wait)
                if record is None:
                    claimed_elsewhere.append(cell)
                    continue
                collect(cell, record)
                bar.update()
        bar.close()
        return

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
    from concurrent.futures import wait as wait_for

    ctx = mp.get_context("spawn")  # no CUDA state or threads inherited from the driver
    slots = ctx.Queue()
    for i in range(workers):
        slots.put(i)
    gpus = visible_gpus() if paths.device in ("auto", "cuda") else []
    wpaths = Paths(runs_dir=paths.runs_dir, data_root=paths.data_root, device="cuda" if gpus else paths.device,
                   download=paths.download)
    threads = max(1, (os.cpu_count() or 1) // workers)
    total = tqdm(total=len(todo), desc="sweep", position=0, unit="cell", disable=quiet(), dynamic_ncols=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, gpus, threads, ctx.RLock())) as pool:
        try:
            pending = {pool.submit(_worker_cell, cell, wpaths, str(out), False): cell for cell in todo}
            while pending:
                finished, _ = wait_for(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cell = pending.pop(fut)
                    try:
                        record = fut.result()
                    except Exception as e:  # noqa: BLE001  (a worker that died: out of memory, killed, ...)
                        record = error_record(cell, f"worker failed: {type(e).__name__}: {e}")
                    if record is None:  # claimed by another sweep: wait for it behind the other cells
                        pending[pool.submit(_worker_cell, cell, wpaths, str(out), True)] = cell
                        continue
                    collect(cell, record)
                    total.update()
        except KeyboardInterrupt:  # stop the workers now; their unfinished cells leave no record and rerun
            pool.shutdown(wait=False, cancel_futures=True)
            for child in mp.active_children():
                child.terminate()
            raise
    total.close()


def run_ray(todo: list[Cell], paths: Paths, out: Path, address: str | None, collect: Collector) -> None:
    """One Ray task per cell: ``num_gpus=1`` when the cluster has GPUs (Ray pins each task's GPU with
    ``CUDA_VISIBLE_DEVICES``), else ``num_cpus=1``. Uses the running Ray instance if ``ray.init`` was called,
    else connects to ``address`` (``auto``: the cluster this node belongs to) or starts a local instance."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'nftbench[dist]' (or pip install ray)") from e
    from tqdm.auto import tqdm

    if not todo:
        return
    started = False
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        remote = ray.remote(max_retries=1, **options)(_ray_cell)
        wpaths = paths if not gpus or paths.device != "auto" else Paths(
            runs_dir=paths.runs_dir, data_root=paths.data_root, device="cuda", download=paths.download)
        pending = {remote.remote(cell, wpaths, str(out), False): cell for cell in todo}
        bar = tqdm(total=len(todo), desc="sweep (ray)", unit="cell", disable=quiet(), dynamic_ncols=True)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    record, log = ray.get(ref)
                    if record is None:  # claimed by another sweep: wait for it behind the other cells
                        pending[remote.remote(cell, wpaths, str(out), True)] = cell
                        continue
                    log_path = out / "logs" / f"{cell.run_id}.log"
                    if log and not log_path.is_file():
                        atomic_write_text(log_path, log)
                except Exception as e:  # noqa: BLE001  (worker crashed, node lost, ...)
                    record = error_record(cell, f"ray task failed: {type(e).__name__}: {e}")
                collect(cell, record)
                bar.update()
                if not quiet():
                    bar.write(f"[{record['status']}] {cell.run_id} {cell.label()}")
        bar.close()
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------------- results
def rebuild_csv(out: Path, run_ids: list[str]) -> Path:
    """Write ``out/results.csv`` (atomically) from ``out/records/*.json``: one row per id of ``run_ids`` that has
    a record, in that order, then every other record of the folder (by start time), so sweeps sharing a folder
    (cifar10-quick and cifar10-quick-all) never drop each other's rows. Nothing else ever writes the CSV, so it
    cannot be half-written or duplicated."""
    import csv
    import io

    def read(p: Path) -> dict[str, Any] | None:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    path = out / "results.csv"
    with file_lock(out / ".results.csv.lock"):  # sweeps sharing the folder: the last rebuild reads every record
        records = [read(out / "records" / f"{run_id}.json") for run_id in run_ids]
        listed = set(run_ids)
        others = [read(p) for p in sorted((out / "records").glob("*.json")) if p.stem not in listed]
        others = sorted((r for r in others if r and "run_id" in r), key=lambda r: str(r.get("started", "")))
        rows = [{k: ("" if v is None else v) for k, v in labelled_row(r).items()} for r in records + others if r]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
    return path


def clean_stale_temp_files(out: Path) -> None:
    """Remove ``.name.tmp<pid>`` files that a killed writer left behind (only those whose process is gone)."""
    for folder in (out, out / "records", out / "logs"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp*"):
            m = re.search(r"\.tmp(\d+)$", p.name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                p.unlink(missing_ok=True)
            except (PermissionError, OverflowError):
                pass


RETRYABLE = ("worker failed", "ray task failed", "OutOfMemoryError", "MemoryError", "RuntimeError", "OSError",
             "TimeoutError", "ConnectionError")


def retryable(error: str) -> bool:
    """Whether a failed cell's error may pass on a rerun (memory, a lost worker, the file system); the others
    (bad values, missing data, NaN losses) need the config or the data fixed first."""
    return error.startswith(RETRYABLE)


def write_table(plan: Plan, out: Path) -> Any:
    import pandas as pd

    from benchmarks.bench import markdown_table

    df = pd.read_csv(out / "results.csv", keep_default_na=True)[CSV_COLUMNS]
    df = df[df.run_id.astype(str).isin({c.run_id for c in plan.cells})]  # this grid's cells; the CSV has them all
    table = markdown_table(df)
    failed = df[df.status != "ok"]
    if len(failed):
        table += ("\nFailed cells (details in logs/<run_id>.log; [retry]: rerunning the sweep retries it, [fix]: fix "
                  "what the error names first, rerunning alone fails the same way):\n\n")
        table += "".join(f"- `{r.run_id}` [{'retry' if retryable(str(r.error)) else 'fix'}] {r.dataset} {r.attack} "
                         f"{r.defense} {r.budget} seed {r.seed}: {r.error}\n" for r in failed.itertuples())
    atomic_write_text(out / "table.md", f"# {plan.name}\n\n{plan.description}\n\n{table}")
    return df, table


@dataclass
class SweepResult:
    plan: Plan
    df: Any
    table: str

    @property
    def failed(self) -> int:
        return int((self.df.status != "ok").sum()) if len(self.df) else 0

    @property
    def to_fix(self) -> int:
        """Failed cells that a rerun alone cannot fix (:func:`retryable`)."""
        failed = self.df[self.df.status != "ok"] if len(self.df) else self.df
        return sum(not retryable(str(e)) for e in failed.error) if len(failed) else 0


def run_sweep(config: str | os.PathLike | dict[str, Any], out: str | os.PathLike, paths: Paths,
              executor: str = "local", workers: int | str | None = 1, address: str | None = None,
              dry_run: bool = False, log: Callable[[str], None] = print,
              reuse: Sequence[str | os.PathLike] = (), only: Sequence[str] = ()) -> SweepResult | Plan:
    """Validate, plan and run a sweep; return the plan (``dry_run``) or the results. ``reuse``: other sweeps'
    output folders whose ``ok`` records of the same run id are copied in instead of rerun. ``only``: ``KEY=VALUE``
    filters (``parse_only``); the other cells are left to other invocations, which may run at the same time into
    the same folder (the run ids, records and CSV are those of the whole grid)."""
    grid = config if isinstance(config, dict) else load_sweep(config)
    if isinstance(config, dict):
        expand(grid)  # validate before any work
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    out = Path(out)
    paths = grid_data_root(grid, paths)
    if executor == "local":
        n_workers = resolve_workers(workers, paths.device)
    else:  # Ray decides; the estimate assumes --workers (or 1) cells at a time
        n_workers = int(workers) if isinstance(workers, int) or str(workers).isdigit() else 1
    for r in map(Path, reuse):
        if not (r / "records").is_dir():
            raise FileNotFoundError(f"--reuse {r}: no records/ folder there; give a sweep's --out folder")
    filters = parse_only(only)
    plan = plan_sweep(grid, out, paths, log=log, reuse=[Path(r) for r in reuse])
    left_out = select_cells(plan, filters)
    if left_out:
        plan.notes.append(f"{left_out} cell(s) not done yet are outside --only {' '.join(only)}; not run here")
    if dry_run:
        log(describe_plan(plan, estimate(plan, device_kind(paths.device), n_workers)))
        return plan
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out)
    for cell in plan.cells:
        if cell.status == "reuse":
            record = json.loads(cell.source.read_text())
            write_record(out / "records" / f"{cell.run_id}.json", {**record, "copied_from": str(cell.source)})
            cell.status = "done"
    todo = plan.todo()
    done = sum(c.status == "done" for c in plan.cells)
    log(f"sweep {plan.name}: {len(plan.cells)} cells, {done} done (skipped), {len(todo)} to run -> {out}")
    for n in plan.notes:
        log(f"note: {n}")
    collect = Collector(plan, out)
    rebuild_csv(out, [c.run_id for c in plan.cells])
    for cell in todo:  # nothing to run for these: record the error (a row in the CSV), the sweep goes on
        if cell.status == "unresolved":
            collect(cell, execute_cell(cell, paths, out))
    todo = [c for c in todo if c.status == "todo"]
    if executor == "ray":
        run_ray(todo, paths, out, address, collect)
    else:
        run_local(todo, paths, out, n_workers, collect)
    rebuild_csv(out, [c.run_id for c in plan.cells])
    df, table = write_table(plan, out)
    log(table)
    return SweepResult(plan, df, table)


__all__ = ["COST_TABLE", "Cell", "Plan", "SweepConfigError", "SweepResult", "describe_plan", "estimate",
           "execute_cell", "expand", "load_sweep", "parse_only", "plan_sweep", "rebuild_csv", "run_sweep",
           "select_cells"]
