"""AWM: Adversarial Weight Masking (Chai & Chen, "One-shot Neural Backdoor Erasing via Adversarial Weight Masking",
NeurIPS 2022, arXiv 2207.04497; authors' code ``jinghuichen/AWM``, ``main.py`` and ``models/maskedconv.py``).

Every weight of every convolution gets its own soft mask ``m`` in [0, 1] (init 1; the conv computes with
``weight * m``, the authors' ``MaskedConv2d``; the final Linear is not masked), the model's weights stay frozen and
the model stays in eval mode. Each epoch (the authors' ``mask_train``), with ``K = inner * floor(n_clean /
batch_size)`` batches drawn with replacement from the clean split (no augmentation):

1. trigger estimation: a universal additive perturbation ``d`` (one sample's shape of ``task.perturbable_input``:
   (C, H, W) pixels for images, a (3, P) per-point offset field for point clouds), restarted at 0, takes one SGD
   step (lr 10) per batch over K batches, maximising ``CE(f(x + d), argmax f(x))`` (the model's own clean
   predictions as labels, untargeted), and is then projected onto the L1 ball of radius ``trigger_norm`` by
   scaling: ``d * min(1, trigger_norm / ||d||_1)``;
2. mask update: over K further batches, Adam on ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(x + d), y) +
   gamma * ||m||_1``, masks clamped to [0, 1] after every step.

The purified model has the masks folded into its conv weights (same architecture and state-dict keys).

Defaults are the authors' (``main.py`` argparse): ``--outer`` 20 epochs, ``--inner`` 5, ``--batch-size`` 128,
``--lr2`` 0.01 (Adam), ``--lr-decay`` off (else ExponentialLR 0.9 per epoch), ``--alpha`` 0.9, ``--gamma`` 1e-8,
``--trigger-norm`` 1000, trigger SGD lr 10. ``trigger_norm`` is an L1 radius in ``task.perturbable_input`` units,
so its strength depends on the input size (1000 over CIFAR-10's 3,072 pixel values is 0.33 per value on average;
the authors' README uses 100 for GTSRB and for the one-shot, 10-sample CIFAR-10 setting, with ``--alpha 0.99``
there). The paper's minimax ``min_m max_{||d||_1 <= tau}`` is this trigger (no separate trigger mask or pattern).

Deviations: the authors clamp ``x + d`` to [0, 1] in the mask step; that is only meaningful for images, so it is
an option (``clip_unit``, off by default: point coordinates are not in [0, 1]); set it for image tasks to match
them. ``K`` is at least ``inner`` (the authors' ``int(n / batch_size) * inner`` is 0, i.e. no training at all,
when the clean split is smaller than one batch). The optional ``--shrink-steps`` pre-stage (default 0) is not
implemented. ``mask_linear`` also masks Linear layers (off, as the authors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from common.guards import check_finite
from defenses.base import register_defense
from defenses.sau import loss_and_logits

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class AWMConfig:
    epochs: int = 20  # --outer
    inner: int = 5  # --inner: each stage of an epoch runs inner * floor(n_clean / batch_size) batches
    batch_size: int = 128
    lr: float = 1e-2  # --lr2, Adam on the masks
    lr_decay: bool = False  # ExponentialLR(gamma=0.9) per epoch
    alpha: float = 0.9  # weight of the clean loss; 1 - alpha weighs the loss under the trigger
    gamma: float = 1e-8  # L1 penalty on the masks
    trigger_lr: float = 10.0  # SGD on the universal perturbation
    trigger_norm: float = 1000.0  # L1 radius of the perturbation
    clip_unit: bool = False  # clamp x + d to [0, 1] in the mask step (the authors' choice for images)
    mask_linear: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.inner < 1 or self.batch_size < 1:
            raise ValueError("awm needs epochs, inner and batch_size >= 1")
        if self.lr <= 0 or self.trigger_lr <= 0 or self.trigger_norm <= 0 or self.gamma < 0:
            raise ValueError("awm needs lr, trigger_lr, trigger_norm > 0 and gamma >= 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"awm alpha must be in [0, 1], got {self.alpha}")


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with one mask entry per weight."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def attach_masks(model: nn.Module, mask_linear: bool) -> list[tuple[nn.Module, WeightMask]]:
    types = (*CONVS, nn.Linear) if mask_linear else CONVS
    masked = []
    for module in model.modules():
        if isinstance(module, types):
            mask = WeightMask(module.weight)
            parametrize.register_parametrization(module, "weight", mask)
            masked.append((module, mask))
    if not masked:
        raise ValueError("awm found no convolution to mask" + ("" if mask_linear else "; try mask_linear=True"))
    return masked


def perturbed(task: Any, batch: Any, delta: Tensor, clip_unit: bool = False) -> Any:
    x = task.perturbable_input(batch) + delta
    return task.with_input(batch, x.clamp(0, 1) if clip_unit else x)


def estimate_trigger(task: Any, model: nn.Module, clean: Any, cfg: AWMConfig, iterations: int, g: torch.Generator
                     ) -> tuple[Tensor, float]:
    """AWM's inner maximisation: the universal perturbation (projected onto the L1 ball) and its L1 norm before
    the projection."""
    delta = None
    for step in range(iterations):
        batch = task.sample_batch(clean, cfg.batch_size, g, augment=False)
        if delta is None:
            x0 = task.perturbable_input(batch)[0]
            delta = torch.zeros_like(x0, memory_format=torch.contiguous_format).requires_grad_(True)
            opt = torch.optim.SGD([delta], lr=cfg.trigger_lr)
        with torch.no_grad():
            labels = loss_and_logits(task, model, batch)[1].argmax(1)
        logits = loss_and_logits(task, model, perturbed(task, batch, delta))[1]
        objective = -F.cross_entropy(logits, labels)
        check_finite(objective, "awm trigger", step)
        (delta.grad,) = torch.autograd.grad(objective, [delta])
        opt.step()
    raw = float(delta.detach().abs().sum())
    return delta.detach() * min(1.0, cfg.trigger_norm / max(raw, 1e-12)), raw


@register_defense("awm", AWMConfig, "Chai & Chen, One-shot Neural Backdoor Erasing via Adversarial Weight Masking, "
                                   "NeurIPS 2022")
def awm(model: nn.Module, task: Any, clean: Any, cfg: AWMConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    acc_before = task.accuracy(model, clean)
    masked = attach_masks(model, cfg.mask_linear)
    masks = [m.mask for _, m in masked]
    opt = torch.optim.Adam(masks, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    iterations = cfg.inner * max(1, task.split_sizes(clean) // cfg.batch_size)
    g = torch.Generator().manual_seed(seed)
    model.eval()
    trace = []
    done = False
    try:
        for epoch in range(cfg.epochs):
            delta, raw_l1 = estimate_trigger(task, model, clean, cfg, iterations, g)
            sums = torch.zeros(2)
            for it in range(iterations):
                batch = task.sample_batch(clean, cfg.batch_size, g, augment=False)
                loss_nat = task.loss(model, batch)
                loss_rob = task.loss(model, perturbed(task, batch, delta, cfg.clip_unit))
                l1 = sum(m.abs().sum() for m in masks)
                loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob + cfg.gamma * l1
                check_finite(loss, "awm", epoch * iterations + it)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                sums += torch.tensor([loss_nat.item(), loss_rob.item()])
            if cfg.lr_decay:
                sched.step()
            trace.append([epoch, round(raw_l1, 4), *(round(v, 4) for v in (sums / iterations).tolist())])
        flat = torch.cat([m.detach().flatten().float().cpu() for m in masks])
        info = {
            "epochs": cfg.epochs, "iterations_per_epoch": iterations, "trigger_steps": cfg.epochs * iterations,
            "mask_steps": cfg.epochs * iterations, "steps": cfg.epochs * iterations,
            "clean_samples": task.split_sizes(clean),
            "masked_layers": len(masked), "masked_weights": flat.numel(), "mask_mean": float(flat.mean()),
            "mask_min": float(flat.min()), "mask_max": float(flat.max()), "mask_below_0.5": int((flat < 0.5).sum()),
            "mask_zero": int((flat == 0).sum()), "trigger_l1": float(delta.abs().sum()),
            "trigger_linf": float(delta.abs().max()),
            "trace": trace,  # [epoch, trigger L1 before projection, clean CE, CE under the trigger]
            "clean_acc_before": acc_before,
        }
        done = True
    finally:  # on success the masks are folded in; on failure the model gets its own weights back
        with torch.no_grad():
            for module, _ in masked:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=done)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
    info["clean_acc"] = task.accuracy(model, clean)
    return model, info
