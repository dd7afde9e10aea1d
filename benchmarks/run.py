"""One run: victim (cached) -> defence on the defender's clean split -> metrics before/after -> record."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from attacks import Attack, create_attack
from benchmarks.interrupts import INTERRUPTED
from benchmarks.records import append_csv_row, der, labelled_row, read_results_csv, write_record
from benchmarks.validate import attack_class_problems, budget_problems, raise_problems, run_problems
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.environment import device_name, versions
from common.fileio import check_write_path
from common.hashing import config_hash
from common.precision import numerics, precision_identity
from defenses import DEFENSES, purify
from tasks import CleanBudget, Task, create_task
from training.victims import get_victim, load_attack_artifacts


# Set by the CLI's Ctrl-C handler. A Ctrl-C that lands inside a library's native code can come back as that library's
# error (safetensors reports a "corrupt" file); checking this flag keeps it an interruption, never a failed run.
@dataclass
class RunConfig:
    """Everything that defines a run; the hash of its resolved form is the run id."""

    task: str = "image"
    dataset: str = "digits"
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    scale: str = "quick"
    attack: str | None = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    defense: str = "nft"
    defense_params: dict[str, Any] = field(default_factory=dict)
    val_frac: float | None = 0.01
    per_class: int | None = None
    seed: int = 0

    def budget(self) -> CleanBudget:
        if self.per_class is not None:
            return CleanBudget(fraction=None, per_class=self.per_class)
        return CleanBudget(fraction=self.val_frac)


@dataclass
class Paths:
    """Where things live and run: victim/data caches, the user's datasets, the device."""

    runs_dir: str | os.PathLike = "runs"
    data_root: str | os.PathLike | None = None
    device: str = "auto"
    download: bool = False


def run_config(task: Task, attack: Attack | None, defense: str, defense_params: dict[str, Any], budget: CleanBudget,
               seed: int) -> dict[str, Any]:
    """The resolved config of a run; its hash is the run id (an explicit precision is part of it, as of victims)."""
    return {"task": task.config(), "attack": attack.config() if attack else None, "defense": defense,
            "defense_params": defense_params, "budget": budget.describe(), "seed": seed, **precision_identity()}


def defend(task: Task, attack: Attack | None, model: nn.Module, victim: dict[str, Any], defense: str,
           defense_params: dict[str, Any], budget: CleanBudget, seed: int) -> tuple[dict[str, Any], nn.Module | None]:
    """Purify ``model`` with ``defense`` on the defender's clean split and build the run's record.

    Errors after set-up (NaN loss, out of memory) give a record with ``status: error``, not a number.
    """
    config = run_config(task, attack, defense, defense_params, budget, seed)
    record: dict[str, Any] = {
        "run_id": config_hash(config), "status": "ok", "config": config, "victim_id": victim["victim_id"],
        "victim_train_time_s": victim["train_time_s"], "before": victim["metrics"], "versions": versions(),
        "device": device_name(task.device), **numerics(task), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    purified = None
    try:
        clean = task.clean_split(budget, seed)
        record["clean_samples"] = task.split_sizes(clean)
        purified, info = purify(defense, model, task, clean, defense_params, seed=seed)
        record["defense_info"] = info
        record["after"] = after = task.evaluate(purified, attack)
        before = record["before"]
        if before["asr"] is not None:
            record["der"] = der(before["clean_acc"], after["clean_acc"], before["asr"], after["asr"])
    except Exception as e:  # noqa: BLE001  (recorded: the record says what failed and where)
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt from e
        record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        purified = None
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record, purified


def run_once(cfg: RunConfig, paths: Paths, results_csv: str | os.PathLike | None = None,
             records_dir: str | os.PathLike | None = "runs/records", skip_done: bool = False) -> dict[str, Any]:
    """Run one cell; write ``records_dir/<run_id>.json`` and one row of ``results_csv``.

    ``skip_done``: a cell whose record already exists with ``status: ok`` is not run again.
    """
    budget = cfg.budget()
    DEFENSES.get(cfg.defense).make_config(cfg.defense_params)  # bad names/options fail before any work
    raise_problems(run_problems(cfg.task, cfg.dataset, cfg.model, cfg.scale, cfg.model_kwargs, cfg.attack, budget))
    if results_csv is not None:  # a path that cannot take the row fails now, not after the run
        check_write_path(results_csv, "results CSV")
        read_results_csv(results_csv)
    if records_dir is not None:
        check_write_path(records_dir, "records folder", kind="folder")
    attack = create_attack(cfg.attack, seed=cfg.seed, **cfg.attack_params) if cfg.attack else None
    task = create_task(cfg.task, dataset=cfg.dataset, model=cfg.model, model_kwargs=cfg.model_kwargs, scale=cfg.scale,
                       data_root=paths.data_root, cache_dir=paths.runs_dir, device=paths.device,
                       download=paths.download)
    raise_problems(attack_class_problems(task, attack))
    done = None
    if records_dir is not None:
        run_id = config_hash(run_config(task, attack, cfg.defense, cfg.defense_params, budget, cfg.seed))
        done = Path(records_dir) / f"{run_id}.json"
    if skip_done and done is not None and done.is_file() and json.loads(done.read_text()).get("status") == "ok":
        record = json.loads(done.read_text())
    else:
        model, victim, _ = get_victim(task, attack, cfg.seed, paths.runs_dir)
        record, _ = defend(task, attack, model, victim, cfg.defense, cfg.defense_params, budget, cfg.seed)
        if done is not None:
            write_record(done, record)
    if results_csv is not None:
        append_csv_row(results_csv, labelled_row(record))
    return record


def load_victim(victim_dir: str | os.PathLike, paths: Paths) -> tuple[Task, Attack | None, nn.Module, dict[str, Any]]:
    """Rebuild the task, attack and model of a victim directory (``victim.json`` + ``model.safetensors``)."""
    d = Path(victim_dir)
    if not (d / "victim.json").is_file():
        raise CheckpointError(f"{d} is not a victim directory (no victim.json); train one with `nftbench train-victim`")
    try:  # a damaged or foreign victim.json (bad JSON, unknown keys, out-of-range values): one error naming it
        meta = json.loads((d / "victim.json").read_text())
        tc = dict(meta["config"]["task"])
        fingerprint = tc.pop("data_fingerprint")
        task = create_task(tc.pop("task"), **tc, data_root=paths.data_root, cache_dir=paths.runs_dir,
                           device=paths.device, download=paths.download)
        ac = meta["config"]["attack"]
        attack = create_attack(ac.pop("name"), **ac) if ac else None
    except FileNotFoundError:
        raise  # the dataset is missing: its message says where to put it
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{d / 'victim.json'} is not a valid victim config ({type(e).__name__}: {e}); "
                              "restore the file or retrain the victim with `nftbench train-victim`") from e
    if task.config()["data_fingerprint"] != fingerprint:
        raise CheckpointError(f"the dataset found now (fingerprint {task.config()['data_fingerprint']}) is not the one "
                              f"this victim was trained on ({fingerprint}); point --data-root at that copy")
    model = load_checkpoint(d / "model.safetensors", task.build_model()).eval()
    task.check_attack(attack)  # builds what the trigger needs (Input-aware's networks) before its weights load
    load_attack_artifacts(attack, d)
    return task, attack, model, meta


def purify_victim(victim_dir: str | os.PathLike, defense: str, defense_params: dict[str, Any], budget: CleanBudget,
                  seed: int, paths: Paths) -> tuple[dict[str, Any], Path]:
    """Purify a saved victim; write ``<victim>/purified/<run_id>/{model.safetensors, record.json}``."""
    DEFENSES.get(defense).make_config(defense_params)
    task, attack, model, meta = load_victim(victim_dir, paths)
    raise_problems(budget_problems(task.name, budget))
    record, purified = defend(task, attack, model, meta, defense, defense_params, budget, seed)
    out = Path(victim_dir) / "purified" / record["run_id"]
    if purified is not None:
        save_checkpoint(out, purified, record, sidecar_name="record.json")
    else:
        write_record(out / "record.json", record)
    return record, out
