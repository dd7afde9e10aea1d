"""Victims: backdoored (or benign) models trained once per config and cached by the config's hash under
``<runs>/victims/<id>`` (``model.safetensors`` + ``victim.json``, and an attack's trained trigger state); a training
that is killed resumes at its last saved epoch (:mod:`training.resume`). The clean models attacks such as Trojan and
CLB optimise against are cached the same way (:func:`clean_model`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from common.checkpoint import load_checkpoint, load_state, save_checkpoint, save_tensors
from common.environment import device_name, versions
from common.fileio import dir_lock
from common.hashing import config_hash
from common.precision import numerics, precision_identity
from tasks.base import Task
from training.loop import steps_per_epoch, train_model
from training.resume import EpochCheckpoint

if TYPE_CHECKING:
    from attacks.base import Attack

VICTIM_FORMAT = 1
ATTACK_ARTIFACTS = "attack.safetensors"
RESUME_STATE = "resume.safetensors"  # a killed training's last saved epoch (training.resume), deleted once done


def victim_config(task: Task, attack: Attack | None, seed: int, max_steps: int | None = None) -> dict[str, Any]:
    """What a victim is, hashed into its id; a precision set explicitly is part of it, ``auto`` is not (why:
    :func:`tasks.base.precision_identity`); a step-capped victim (``max_steps``, for timing runs) gets an id of its
    own."""
    config = {"format": VICTIM_FORMAT, "task": task.config(), "attack": attack.config() if attack else None,
              "seed": seed, "recipe": task.recipe(), **precision_identity()}
    return config if max_steps is None else {**config, "max_steps": max_steps}


def victim_dir(runs_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    return Path(runs_dir) / "victims" / config_hash(config)


def get_victim(task: Task, attack: Attack | None, seed: int, runs_dir: str | os.PathLike = "runs",
               max_steps: int | None = None) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load the cached victim for this config, or train and cache it. Returns (model, victim.json, dir).
    ``max_steps`` caps the training (a timing run's victim, cached under its own id)."""
    task.check_attack(attack)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if max_steps is not None and attack is not None and attack.trains_victim:
        raise ValueError(f"attack {attack.name!r} trains its victim itself, which --max-steps does not cap; "
                         "leave --max-steps out")
    config = victim_config(task, attack, seed, max_steps)
    d = victim_dir(runs_dir, config)
    if not _cached(d):
        with dir_lock(d):  # another worker may be training it: wait, then load its result
            if not _cached(d):
                return _train_victim(task, attack, seed, config, d, max_steps)
    meta = json.loads((d / "victim.json").read_text())
    here = numerics(task)["precision"]
    if meta.get("precision", here) != here:  # only under ``auto``: an explicit precision is part of the id
        print(f"nftbench: note: cached victim {d.name} was trained in {meta['precision']} (precision auto on the "
              f"machine that trained it); here auto computes in {here}. For victims in one explicit precision, set "
              "--precision (they get ids of their own)", file=sys.stderr)
    model = load_checkpoint(d / "model.safetensors", task.build_model())
    load_attack_artifacts(attack, d)
    return model.eval(), meta, d


def load_attack_artifacts(attack: Attack | None, d: Path) -> None:
    """Restore an attack's trained trigger state (``attack.safetensors``) saved with the victim in ``d``."""
    if attack is None:
        return
    path = d / ATTACK_ARTIFACTS
    attack.load_artifacts(load_state(path) if path.is_file() else {})


def clean_model(task: Task, seed: int) -> nn.Module:
    """The task's benign model (its recipe, the attacker's clean training split), cached like a victim under the
    task's cache dir: the clean model attacks such as Trojan and CLB optimise their triggers against."""
    model, _, _ = get_victim(task, None, seed, task.cache_dir)
    return model


def _cached(d: Path) -> bool:
    return (d / "victim.json").is_file() and (d / "model.safetensors").is_file()


def _train_victim(task: Task, attack: Attack | None, seed: int, config: dict[str, Any], d: Path,
                  max_steps: int | None = None) -> tuple[nn.Module, dict[str, Any], Path]:
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    start = time.perf_counter()
    train, poisoned = task.attacker_train(attack, seed)
    name = attack.name if attack else "benign"
    resume = EpochCheckpoint(d / RESUME_STATE) if max_steps is None else None
    model = attack.train_victim(task, train, task.recipe(), seed, resume) if attack is not None else None
    if model is None:
        model = train_model(task, train, task.recipe(), seed, desc=f"victim {name}", max_steps=max_steps,
                            checkpoint=resume)
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    train_time = time.perf_counter() - start + (resume.prior_s if resume else 0.0)
    recipe = task.recipe()
    n = task.split_sizes(train)
    steps = recipe["epochs"] * steps_per_epoch(n, recipe["batch_size"])
    steps = steps if max_steps is None else min(steps, max_steps)
    metrics = task.evaluate(model, attack)
    meta = {
        "victim_id": d.name, "config": config, "metrics": metrics, "train_time_s": train_time,
        "train_images_per_s": steps * min(n, recipe["batch_size"]) / train_time,
        "train_samples": n, "poisoned_samples": len(poisoned),
        "device": device_name(task.device), **numerics(task), "versions": versions(),
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if resume and resume.resumed:
        meta["resumed_at_epoch"] = resume.resumed_epoch  # train_time_s adds the seconds trained before the restart
    info = attack.victim_info() if attack is not None else {}
    if info:
        meta["attack_info"] = info
    artifacts = attack.artifacts() if attack is not None else {}
    if artifacts:  # before the victim files: a victim counts as cached only once both exist
        save_tensors(d / ATTACK_ARTIFACTS, artifacts)
    save_checkpoint(d, model, meta, sidecar_name="victim.json")
    if resume:
        resume.clear()
    return model, meta, d
