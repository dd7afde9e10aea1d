"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023, arXiv 2304.11823). The authors' code is
BackdoorBench's ``defense/ft-sam.py`` with ``utils/defense_utils/sam`` and ``config/defense/ft-sam``.

Every weight is fine-tuned on the clean split; each step takes two forward/backward passes: the gradient ``g`` at
``w``, then the gradient at ``w + e`` with the adaptive (ASAM, Kwon et al., ICML 2021) perturbation
``e = rho * T^2 g / ||T g||_2``, ``T = |w|`` elementwise over all parameters (``adaptive=False``: ``T = 1``, plain
SAM), weights restored to ``w`` and the optimiser stepped with the second gradient. The second pass leaves the
BatchNorm running statistics untouched, as the authors' ``disable_running_stats``. Defaults, and where they
come from:

- ``rho=2.0``, ``adaptive=True``, label smoothing ``smoothing=0.1``: BackdoorBench's argparse defaults, which
  override its YAMLs (its ``defaults.update`` takes every non-None argument), so they hold for every dataset
  although ``gtsrb.yaml`` / ``tiny.yaml`` say rho 8 and smoothing 0. ``rho_min == rho_max`` there, so rho is
  constant; GSAM's gradient decomposition (``alpha``) is 0 there, so it is not implemented.
- ``smoothing`` is BackdoorBench's ``smooth_crossentropy`` parametrisation (1 - eps on the label, eps / (K - 1)
  on each other class), passed to ``task.loss`` as torch's ``label_smoothing = eps * K / (K - 1)``, the same
  target distribution (their KL divergence differs from cross-entropy by a constant).
- SGD ``lr=0.01``, ``momentum=0.9``, ``weight_decay=5e-4`` (BackdoorBench's config), weight decay applied at
  ``w`` by the base optimiser, not inside the perturbation, as theirs.
- ``steps=1000``, ``batch_size=128``, batches with replacement with the task's augmentation, cosine to 0: the
  suite's ``ft`` budget (``defenses/ft.py``), so FT-SAM and FT differ only by SAM.

Deviations: BackdoorBench trains 100 epochs of batch 256 on 5% of the training set (~1000 steps on CIFAR-10)
and steps its ``CosineAnnealingLR(T_max=100)`` once per *batch*, so its learning rate oscillates with a
200-batch period; here the schedule is one cosine over the step budget, as ``ft``. Weights are restored by
copying the saved ``w`` (theirs subtracts ``e``, exact up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.guards import check_finite
from defenses.base import register_defense
from defenses.ft import check_finetune_options

EPS = 1e-12  # the authors' perturb_eps


@dataclass
class FTSAMConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.01
    final_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 2.0
    adaptive: bool = True
    smoothing: float = 0.1
    augment: bool = True

    def __post_init__(self):
        check_finetune_options("ft-sam", self.steps, self.batch_size, self.lr, self.final_lr, self.momentum,
                               self.weight_decay)
        if self.rho <= 0 or not 0 <= self.smoothing < 1:
            raise ValueError("ft-sam needs rho > 0 and smoothing in [0, 1)")


def sam_perturbation(params: Sequence[Tensor], rho: float, adaptive: bool) -> list[Tensor]:
    """``rho * T^2 g / (||T g||_2 + eps)`` per parameter, the norm over all of them; ``T = |w|`` or 1."""
    scaled = [p.grad * p.abs() if adaptive else p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    scale = rho / (norm + EPS)
    return [(s * p.abs() if adaptive else s) * scale for s, p in zip(scaled, params, strict=True)]


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Undo any change a forward pass makes to the model's buffers (BatchNorm running statistics)."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)


def sam_step(model: nn.Module, loss_fn: Callable[[], Tensor], opt: torch.optim.Optimizer, rho: float,
             adaptive: bool, step: int = 0) -> tuple[Tensor, Tensor]:
    """One SAM step on every parameter that gets a gradient; returns the losses at ``w`` and at ``w + e``."""
    loss = loss_fn()
    check_finite(loss, "ft-sam", step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, e in zip(params, sam_perturbation(params, rho, adaptive), strict=True):
            p.add_(e)
    with frozen_buffers(model):
        perturbed = loss_fn()
        check_finite(perturbed, "ft-sam (perturbed weights)", step)
        opt.zero_grad(set_to_none=True)
        perturbed.backward()
    with torch.no_grad():
        for p, w in zip(params, saved, strict=True):
            p.copy_(w)
    opt.step()
    return loss.detach(), perturbed.detach()


@register_defense("ft-sam", FTSAMConfig, "Zhu, Wei, Shen, Fan, Wu, Enhancing Fine-Tuning Based Backdoor Defense "
                                         "with Sharpness-Aware Minimization, ICCV 2023")
def ft_sam(model: nn.Module, task: Any, clean: Any, cfg: FTSAMConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    label_smoothing = cfg.smoothing * task.num_classes / (task.num_classes - 1)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.final_lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses, perturbed_losses = [], []
    for step in range(cfg.steps):
        batch = task.sample_batch(clean, cfg.batch_size, g, augment=cfg.augment)
        loss, perturbed = sam_step(model, lambda b=batch: task.loss(model, b, label_smoothing=label_smoothing),
                                   opt, cfg.rho, cfg.adaptive, step)
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            losses.append(round(loss.item(), 4))
            perturbed_losses.append(round(perturbed.item(), 4))
    model.eval()
    return model, {
        "steps": cfg.steps, "rho": cfg.rho, "adaptive": cfg.adaptive,
        "torch_label_smoothing": label_smoothing, "loss_trace": losses, "perturbed_loss_trace": perturbed_losses,
        "clean_samples": task.split_sizes(clean),
    }
