"""Sweep files: find a sweep YAML (a path or a preset of ``benchmarks/configs``), load it and expand it into its
cells (``RunConfig``s), validating every cell first.

Unknown keys, unknown names, options that do not exist, values of the wrong type or range (``nft: {steps: -1}``,
``mixup: maybe``, ``poison_rate: 2``, a model ``width: -1``), attacks or budgets the task cannot take
(``benchmarks.validate``) and a ``name`` that is not a plain folder name are collected into one
:class:`SweepConfigError` that names each fix, before any work starts.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import yaml

from benchmarks.run import Paths, RunConfig
from benchmarks.validate import attack_problems, budget_problems, model_problems

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

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")


class SweepConfigError(ValueError):
    """A sweep file that cannot run as written; the message lists every problem and its fix."""


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

