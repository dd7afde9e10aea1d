"""Victims: backdoored (or benign) models trained once per config and cached by the config's hash."""

from __future__ import annotations

import contextlib
import itertools
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
from defenses.base import FiniteCheck, fused_options, maybe_compile
from tasks.base import Task, precision_identity
from tasks.fileio import file_lock

VICTIM_FORMAT = 1
ATTACK_ARTIFACTS = "attack.safetensors"


def victim_config(task: Task, attack: Attack | None, seed: int, max_steps: int | None = None) -> dict[str, Any]:
    """What a victim is, hashed into its id; a precision set explicitly is part of it, ``auto`` is not (why:
    :func:`tasks.base.precision_identity`); a step-capped victim (``max_steps``, for timing runs) gets an id of its
    own."""
    config = {"format": VICTIM_FORMAT, "task": task.config(), "attack": attack.config() if attack else None,
              "seed": seed, "recipe": task.recipe(), **precision_identity()}
    return config if max_steps is None else {**config, "max_steps": max_steps}


def victim_dir(runs_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    return Path(runs_dir) / "victims" / config_hash(config)


@contextlib.contextmanager
def victim_lock(d: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<victims>/<hash>.lock`` so concurrent workers (processes, Ray tasks on a shared
    file system) never train the same victim twice at once (:func:`tasks.fileio.file_lock`: a dead worker leaves
    no stale lock)."""
    with file_lock(d.parent / f"{d.name}.lock"):
        yield


def quiet() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("NFTBENCH_QUIET") == "1"


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``n`` samples (the last partial batch is dropped unless there is only one)."""
    return max(1, n // batch_size) if n >= 2 * batch_size else 1


def recipe_optimizer(model: nn.Module, recipe: dict[str, Any], n: int) -> tuple[torch.optim.Optimizer, Any]:
    """The recipe's optimiser and per-step schedule for ``n`` training samples: SGD (default) or Adam (``optimizer:
    adam``, beta1 = ``momentum``, beta2 = ``beta2``, default 0.999); one-cycle, cosine, step decay (``schedule: step``:
    lr x ``gamma`` every ``step_epochs``), ``inverse_sqrt`` (fairseq's: linear warm-up over ``warmup_steps``, then
    lr x sqrt(warmup_steps / step)) or ``triangle`` (airbench: ``start_factor`` -> 1 over ``warmup_fraction`` of the
    steps, then -> ``end_factor``).

    airbench's options (the fast recipe): ``decoupled_weight_decay`` (each weight shrinks by ``weight_decay`` x the
    schedule's factor per step, whatever its group's lr), ``norm_bias_lr_scale`` (BatchNorm biases at that multiple
    of the lr), ``early_param_epochs`` (the model's ``early_params`` train for that many epochs, then stop) and
    ``lookahead`` (:class:`Lookahead`, wrapped around the schedule so every training loop that steps it gets it)."""
    per_epoch = steps_per_epoch(n, recipe["batch_size"])
    total = recipe["epochs"] * per_epoch
    groups = param_groups(model, recipe)
    if recipe.get("optimizer", "sgd") == "adam":
        betas = (recipe["momentum"], recipe.get("beta2", 0.999))
        opt = torch.optim.Adam(groups, lr=recipe["lr"], betas=betas, weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"],
                              weight_decay=recipe["weight_decay"], **fused_options(model))
    if recipe["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total, pct_start=0.25,
                                                    anneal_strategy="linear", div_factor=10, final_div_factor=20)
    elif recipe["schedule"] == "inverse_sqrt":
        warm = recipe["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    elif recipe["schedule"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe["step_epochs"] * per_epoch, gamma=recipe["gamma"])
    elif recipe["schedule"] == "triangle":
        factor = triangle(total, recipe["warmup_fraction"], recipe["start_factor"], recipe["end_factor"])
        early_steps = recipe.get("early_param_epochs", recipe["epochs"]) * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [(lambda s: factor(s) if s < early_steps else 0.0) if g["early"] else factor for g in groups])
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return opt, (Lookahead(model, sched, total) if recipe.get("lookahead") else sched)


def param_groups(model: nn.Module, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainable parameters in groups: BatchNorm biases (lr x ``norm_bias_lr_scale``), the model's
    ``early_params`` (``early: True``) and the rest; with ``decoupled_weight_decay`` each group's decay is divided by
    its lr, so SGD's ``lr x decay`` shrink is the same ``weight_decay`` in every group."""
    net = getattr(model, "net", model)
    early = {f"net.{n}" if net is not model else n for n in getattr(net, "early_params", ())}
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
    scale = recipe.get("norm_bias_lr_scale", 1.0)
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (scale if id(p) in norm_biases else 1.0, name in early)
            buckets.setdefault(key, []).append(p)
    groups = []
    for (lr_scale, is_early), params in sorted(buckets.items()):
        lr = recipe["lr"] * lr_scale
        decay = recipe["weight_decay"] / lr if recipe.get("decoupled_weight_decay") else recipe["weight_decay"]
        groups.append({"params": params, "lr": lr, "weight_decay": decay, "early": is_early})
    return groups


def triangle(total: int, warmup_fraction: float, start: float, end: float):
    """airbench's lr factor at step s of ``total``: linear ``start`` -> 1 over the first ``warmup_fraction``, then
    linear 1 -> ``end``."""
    warm = max(1, int(total * warmup_fraction))

    def factor(s: int) -> float:
        if s < warm:
            return start + (1 - start) * s / warm
        return 1 + (end - 1) * (s - warm) / max(1, total - warm)

    return factor


class Lookahead:
    """airbench's lookahead (Jordan 2024, Sec. 3.5; Zhang et al., NeurIPS 2019): every 5 steps the floating-point
    state (weights and BN statistics) moves to an average, ``avg <- decay * avg + (1 - decay) * w; w <- avg``, with
    ``decay = 0.95^5 x (step / total)^3``; after the last step the model takes the average. Wraps the lr schedule, so
    the training loops need no change: ``step()`` steps the schedule, then averages."""

    every = 5

    def __init__(self, model: nn.Module, schedule: Any, total: int):
        self.model, self.schedule, self.total = model, schedule, total
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.steps = 0

    def step(self) -> None:
        self.schedule.step()
        self.steps += 1
        if self.steps == self.total:
            self._update(1.0)
        elif self.steps % self.every == 0:
            self._update(0.95**self.every * (self.steps / self.total) ** 3)

    @torch.no_grad()
    def _update(self, decay: float) -> None:
        state = self.model.state_dict()
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - decay)
            state[k].copy_(avg)

    def get_last_lr(self) -> list[float]:
        return self.schedule.get_last_lr()


def train_model(task: Task, split: Any, recipe: dict[str, Any], seed: int, desc: str = "train",
                max_steps: int | None = None) -> nn.Module:
    """Train a fresh model on ``split`` with the task's recipe (optimiser and schedule: :func:`recipe_optimizer`);
    ``max_steps`` stops it early on the recipe's own schedule (timing runs). No host sync per step: the NaN check
    reads back every 100 steps on an accelerator (:class:`FiniteCheck`), the loss only when a progress bar shows."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    forward = maybe_compile(model)
    g = torch.Generator().manual_seed(seed + 1)
    n, bs = task.split_sizes(split), recipe["batch_size"]
    total = recipe["epochs"] * steps_per_epoch(n, bs)
    total = total if max_steps is None else min(total, max_steps)
    opt, sched = recipe_optimizer(model, recipe, n)
    finite = FiniteCheck(desc)
    bar = tqdm(total=total, desc=desc, disable=quiet(), leave=False)
    batches = (b for _ in range(recipe["epochs"]) for b in task.epoch_batches(split, bs, g))
    step = -1
    for step, batch in enumerate(itertools.islice(batches, max_steps)):
        loss = task.loss(forward, batch, label_smoothing=recipe.get("label_smoothing", 0.0))
        finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update()
        if (step + 1) % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    finite.finish(step)
    bar.close()
    model.eval()
    return model


def get_victim(task: Task, attack: Attack | None, seed: int, runs_dir: str | os.PathLike = "runs",
               max_steps: int | None = None) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load the cached victim for this config, or train and cache it. Returns (model, victim.json, dir).
    ``max_steps`` caps the training (a timing run's victim, cached under its own id)."""
    task.check_attack(attack)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if max_steps is not None and attack is not None and type(attack).train_victim is not Attack.train_victim:
        raise ValueError(f"attack {attack.name!r} trains its victim itself, which --max-steps does not cap; "
                         "leave --max-steps out")
    config = victim_config(task, attack, seed, max_steps)
    d = victim_dir(runs_dir, config)
    if not _cached(d):
        with victim_lock(d):  # another worker may be training it: wait, then load its result
            if not _cached(d):
                return _train_victim(task, attack, seed, config, d, max_steps)
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


def _train_victim(task: Task, attack: Attack | None, seed: int, config: dict[str, Any], d: Path,
                  max_steps: int | None = None) -> tuple[nn.Module, dict[str, Any], Path]:
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    start = time.perf_counter()
    train, poisoned = task.attacker_train(attack, seed)
    name = attack.name if attack else "benign"
    model = attack.train_victim(task, train, task.recipe(), seed) if attack is not None else None
    if model is None:
        model = train_model(task, train, task.recipe(), seed, desc=f"victim {name}", max_steps=max_steps)
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    train_time = time.perf_counter() - start
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
