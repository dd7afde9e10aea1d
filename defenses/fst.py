"""FST: Feature Shift Tuning (Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through Feature Shift
Tuning", NeurIPS 2023, arXiv 2310.01875; authors' code github.com/AISafety-HKUST/stable_backdoor_purification,
``fine_tune/ft.py`` with ``--ft_mode fst``).

The linear classifier is re-initialised, then the whole model is fine-tuned on the clean split with
``CE + alpha * <W, W_orig>`` (the inner product of the head's weight with the suspect model's head weight, which
pushes the new head away from the compromised one), and after every step the head's weight is rescaled to the
original head's Frobenius norm. Defaults, and where they come from:

- ``alpha=0.2``, ``lr=0.01``, ``epochs=10``: the paper's CIFAR-10 setting (on GTSRB it uses alpha 0.1 and 15
  epochs; on CIFAR-100 / Tiny-ImageNet lr 0.001, alpha 0.001, 15 epochs); the code's ``--alpha`` default is 0.2,
  its README example uses 0.1. The paper tunes on 2% of the training set (5% for CIFAR-100 / Tiny-ImageNet).
- SGD ``momentum=0.9`` without weight decay, ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch,
  ``batch_size=128``, shuffled epochs of the clean split with crop+flip augmentation: the authors' code.
- Re-initialisation as theirs: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)) (drawn from ``seed``); the new
  weight keeps its random-init norm for the first step and is rescaled after it.

The head is the last ``nn.Linear`` the forward pass runs (its output is the logits; checked against the class
count). Fine-pruning's ``find_head`` is not reused: it looks for the Linear that reads the feature layer, which
for PointNet is the first classifier FC (256 -> 128), not the linear classifier FST re-initialises.

Deviations: the last partial batch of an epoch is dropped when the clean split holds at least two batches
(``task.epoch_batches``; the authors' loader keeps it). Their code reports the last epoch's model and so does
this (no test-data selection to replace).

:func:`tune_epochs` is the epoch-based engine NAD (``defenses/nad.py``) reuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.guards import check_finite
from defenses.base import register_defense
from defenses.fine_pruning import module_name
from tasks.base import Batch


@dataclass
class FSTConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    alpha: float = 0.2
    augment: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("fst needs epochs >= 1 and batch_size >= 1")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.alpha < 0:
            raise ValueError("fst needs lr > 0, momentum in [0, 1), weight_decay >= 0 and alpha >= 0")


def tune_epochs(model: nn.Module, task: Any, clean: Any, *, epochs: int, batch_size: int,
                lr_at: Callable[[int], float], momentum: float, weight_decay: float, generator: torch.Generator,
                nesterov: bool = False, augment: bool = True, where: str = "tune",
                penalty: Callable[[Batch], Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """SGD on all weights over ``epochs`` shuffled passes of ``clean`` (``task.epoch_batches``), learning rate
    ``lr_at(epoch)``, model in train mode. The loss is ``task.loss`` plus ``penalty(batch)``, called right after
    the model's forward so that hooks on it hold this batch's activations; ``after_step`` runs under no_grad
    after each optimiser step. Returns ``{"steps", "loss_trace"}``; leaves the model in eval."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov)
    model.train()
    steps, losses = 0, []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch)
        for batch in task.epoch_batches(clean, batch_size, generator, augment=augment):
            loss = task.loss(model, batch)
            if penalty is not None:
                loss = loss + penalty(batch)
            check_finite(loss, where, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            steps += 1
        losses.append(round(loss.item(), 4))
    model.eval()
    return {"steps": steps, "loss_trace": losses}


@torch.no_grad()
def logit_layer(model: nn.Module, task: Any, clean: Any) -> nn.Linear:
    """The last ``nn.Linear`` run in the forward pass, which must output one logit per class."""
    ran: list[nn.Linear] = []
    handles = [m.register_forward_hook(lambda m, _a, _o: ran.append(m))
               for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        task.loss(model, next(iter(task.iter_batches(clean, 2))))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not ran or ran[-1].out_features != task.num_classes:
        raise ValueError(f"fst needs the model's logits to come from a final nn.Linear with {task.num_classes} "
                         f"outputs; the last Linear run has {ran[-1].out_features if ran else 'none'}")
    return ran[-1]


@register_defense("fst", FSTConfig, "Min, Qin, Shen, Cheng, Towards Stable Backdoor Purification through Feature "
                                   "Shift Tuning, NeurIPS 2023")
def fst(model: nn.Module, task: Any, clean: Any, cfg: FSTConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    head = logit_layer(model, task, clean)
    original = head.weight.detach().clone()
    norm = torch.linalg.vector_norm(original)
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(head.in_features)
    with torch.no_grad():
        for t in (head.weight, head.bias):
            if t is not None:
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * bound)

    def shift(_batch: Batch) -> Tensor:
        return cfg.alpha * (head.weight * original).sum()

    def keep_norm() -> None:
        head.weight.mul_(norm / torch.linalg.vector_norm(head.weight))

    info = tune_epochs(model, task, clean, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       lr_at=lambda e: cfg.lr * (1 + math.cos(math.pi * e / cfg.epochs)) / 2,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, generator=g, augment=cfg.augment,
                       where="fst", penalty=shift, after_step=keep_norm)
    w = head.weight.detach()
    return model, {
        **info, "head": module_name(model, head), "alpha": cfg.alpha, "head_norm_original": float(norm),
        "head_norm_final": float(torch.linalg.vector_norm(w)),
        "head_cosine_to_original": float(F.cosine_similarity(w.flatten(), original.flatten(), dim=0)),
        "clean_samples": task.split_sizes(clean),
    }
