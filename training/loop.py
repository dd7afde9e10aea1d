"""The victim recipes' training loop: the optimiser and schedule a recipe names (:func:`recipe_optimizer`, with
airbench's parameter groups, triangular schedule and lookahead for the fast scale) and :func:`train_model`, the loop
every victim without its own (joint) training uses. Attacks that train their victim jointly build on the same
optimiser and schedule."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from common.guards import FiniteCheck, fused_options, maybe_compile, progress
from tasks.base import Task
from training.resume import EpochCheckpoint, TrainingState


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

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        for k, v in state["average"].items():
            self.average[k].copy_(v)
        self.steps = state["steps"]


def recipe_step(task: Task, forward: Any, batch: Any, recipe: dict[str, Any], opt: torch.optim.Optimizer,
                sched: Any, finite: FiniteCheck, step: int) -> torch.Tensor:
    """One step of the recipe on ``batch``: the loss (with the recipe's label smoothing), the NaN check, backward,
    the optimiser and the schedule. Returns the loss, not read back."""
    loss = task.loss(forward, batch, label_smoothing=recipe.get("label_smoothing", 0.0))
    finite(loss, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss


def train_model(task: Task, split: Any, recipe: dict[str, Any], seed: int, desc: str = "train",
                max_steps: int | None = None, checkpoint: EpochCheckpoint | None = None) -> nn.Module:
    """Train a fresh model on ``split`` with the task's recipe (optimiser and schedule: :func:`recipe_optimizer`);
    ``max_steps`` stops it early on the recipe's own schedule (timing runs); ``checkpoint`` saves the state at epoch
    ends and resumes from it (:mod:`training.resume`). No host sync per step: the NaN check reads back every 100
    steps on an accelerator (:class:`FiniteCheck`), the loss only when a progress bar shows."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    forward = maybe_compile(model)
    g = torch.Generator().manual_seed(seed + 1)
    n, bs = task.split_sizes(split), recipe["batch_size"]
    per_epoch = steps_per_epoch(n, bs)
    total = recipe["epochs"] * per_epoch if max_steps is None else min(recipe["epochs"] * per_epoch, max_steps)
    opt, sched = recipe_optimizer(model, recipe, n)
    state = TrainingState(checkpoint, recipe["epochs"], model=model, optimizer=opt, schedule=sched, generator=g)
    start, _ = state.start_epoch()
    finite = FiniteCheck(desc)
    bar = progress(total, desc, initial=start * per_epoch)
    step = start * per_epoch - 1
    for epoch in range(start, recipe["epochs"]):
        for batch in itertools.islice(task.epoch_batches(split, bs, g), total - step - 1):
            step += 1
            loss = recipe_step(task, forward, batch, recipe, opt, sched, finite, step)
            bar.update()
            if (step + 1) % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if step + 1 == total:
            break
        state.epoch_done(epoch)
    finite.finish(step)
    bar.close()
    model.eval()
    return model
