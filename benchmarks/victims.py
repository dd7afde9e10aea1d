"""Victims: backdoored (or benign) models trained once per config and cached by the config's hash."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from attacks.base import Attack
from benchmarks.checkpoint import load_checkpoint, load_state, save_checkpoint
from benchmarks.records import config_hash, device_name, numerics, versions
from defenses.base import check_finite
from tasks.base import Task, precision_identity

VICTIM_FORMAT = 1
ATTACK_ARTIFACTS = "attack.safetensors"


def victim_config(task: Task, attack: Attack | None, seed: int) -> dict[str, Any]:
    """What a victim is, hashed into its id; a precision set explicitly is part of it, ``auto`` is not (why:
    :func:`tasks.base.precision_identity`)."""
    return {"format": VICTIM_FORMAT, "task": task.config(), "attack": attack.config() if attack else None,
            "seed": seed, "recipe": task.recipe(), **precision_identity()}


def victim_dir(runs_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    return Path(runs_dir) / "victims" / config_hash(config)


@contextlib.contextmanager
def victim_lock(d: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<victims>/<hash>.lock`` so concurrent workers (processes, Ray tasks on a shared
    file system) never train the same victim twice at once. ``flock`` is released by the kernel when its holder
    exits, even on SIGKILL, so a dead worker leaves no stale lock (the empty lock file itself is harmless)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        yield
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(d.parent / f"{d.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def quiet() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("NFTBENCH_QUIET") == "1"


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``n`` samples (the last partial batch is dropped unless there is only one)."""
    return max(1, n // batch_size) if n >= 2 * batch_size else 1


def recipe_optimizer(model: nn.Module, recipe: dict[str, Any], n: int) -> tuple[torch.optim.Optimizer, Any]:
    """The recipe's optimiser and per-step schedule for ``n`` training samples: SGD (default) or Adam (``optimizer:
    adam``, beta1 = ``momentum``, beta2 = ``beta2``, default 0.999); one-cycle, cosine, step decay (``schedule: step``:
    lr x ``gamma`` every ``step_epochs``), or ``inverse_sqrt`` (fairseq's: linear warm-up over ``warmup_steps``, then
    lr x sqrt(warmup_steps / step))."""
    per_epoch = steps_per_epoch(n, recipe["batch_size"])
    total = recipe["epochs"] * per_epoch
    if recipe.get("optimizer", "sgd") == "adam":
        betas = (recipe["momentum"], recipe.get("beta2", 0.999))
        opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], betas=betas, weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                              nesterov=recipe["nesterov"], weight_decay=recipe["weight_decay"])
    if recipe["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total, pct_start=0.25,
                                                    anneal_strategy="linear", div_factor=10, final_div_factor=20)
    elif recipe["schedule"] == "inverse_sqrt":
        warm = recipe["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    elif recipe["schedule"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe["step_epochs"] * per_epoch, gamma=recipe["gamma"])
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return opt, sched


def train_model(task: Task, split: Any, recipe: dict[str, Any], seed: int, desc: str = "train") -> nn.Module:
    """Train a fresh model on ``split`` with the task's recipe (optimiser and schedule: :func:`recipe_optimizer`)."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    n, bs = task.split_sizes(split), recipe["batch_size"]
    total = recipe["epochs"] * steps_per_epoch(n, bs)
    opt, sched = recipe_optimizer(model, recipe, n)
    step = 0
    bar = tqdm(total=total, desc=desc, disable=quiet(), leave=False)
    for _ in range(recipe["epochs"]):
        for batch in task.epoch_batches(split, bs, g):
            loss = task.loss(model, batch, label_smoothing=recipe.get("label_smoothing", 0.0))
            check_finite(loss, desc, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


def get_victim(task: Task, attack: Attack | None, seed: int, runs_dir: str | os.PathLike = "runs"
               ) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load the cached victim for this config, or train and cache it. Returns (model, victim.json, dir)."""
    task.check_attack(attack)
    config = victim_config(task, attack, seed)
    d = victim_dir(runs_dir, config)
    if not _cached(d):
        with victim_lock(d):  # another worker may be training it: wait, then load its result
            if not _cached(d):
                return _train_victim(task, attack, seed, config, d)
    meta = json.loads((d / "victim.json").read_text())
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


def _train_victim(task: Task, attack: Attack | None, seed: int, config: dict[str, Any], d: Path
                  ) -> tuple[nn.Module, dict[str, Any], Path]:
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    start = time.perf_counter()
    train, poisoned = task.attacker_train(attack, seed)
    name = attack.name if attack else "benign"
    model = attack.train_victim(task, train, task.recipe(), seed) if attack is not None else None
    if model is None:
        model = train_model(task, train, task.recipe(), seed, desc=f"victim {name}")
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    train_time = time.perf_counter() - start
    recipe = task.recipe()
    n = task.split_sizes(train)
    steps = recipe["epochs"] * (max(1, n // recipe["batch_size"]) if n >= 2 * recipe["batch_size"] else 1)
    metrics = task.evaluate(model, attack)
    meta = {
        "victim_id": d.name, "config": config, "metrics": metrics, "train_time_s": train_time,
        "train_images_per_s": steps * min(n, recipe["batch_size"]) / train_time,
        "train_samples": n, "poisoned_samples": len(poisoned),
        "device": device_name(task.device), **numerics(task), "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    info = attack.victim_info() if attack is not None else {}
    if info:
        meta["attack_info"] = info
    artifacts = attack.artifacts() if attack is not None else {}
    if artifacts:  # before the victim files: a victim counts as cached only once both exist
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{ATTACK_ARTIFACTS}.tmp{os.getpid()}"
        save_file({k: v.detach().cpu().contiguous() for k, v in artifacts.items()}, str(tmp))
        os.replace(tmp, d / ATTACK_ARTIFACTS)
    save_checkpoint(d, model, meta, sidecar_name="victim.json")
    return model, meta, d
