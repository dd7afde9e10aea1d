"""FT: plain weight fine-tuning on the defender's clean split, the motivating baseline of the NFT paper
(Karim, Arafat, Khalid, Guo, Rahnavard, "Augmented Neural Fine-Tuning for Efficient Backdoor
Purification", ECCV 2024, arXiv 2407.10052; vanilla fine-tuning as a defence goes back to Liu, Dolan-Gavitt,
Garg, "Fine-Pruning", RAID 2018).

Every weight of the model is trained with cross-entropy (``task.loss``) on the clean split, model in
train mode so BatchNorm statistics adapt. Defaults, and where they come from:

- ``steps=1000``, ``batch_size=128``, batches drawn with replacement via ``task.sample_batch`` with the
  task's crop+flip augmentation: the same clean data and step budget as NFT (``defenses/nft.py``), so FT
  and NFT differ only in *what* is trained (all weights vs. one mask per neuron) and NFT's MixUp.
- ``lr=0.01``, ``momentum=0.9``, ``weight_decay=5e-4``, cosine annealing to 0: BackdoorBench's fine-tuning
  recipe (its ``ft``/``fp`` configs and its PreAct-ResNet-18 training recipe).
- ``label_smoothing=0``: plain cross-entropy, as BackdoorBench.

:func:`finetune` is the shared engine; Fine-Pruning (``defenses/fine_pruning.py``) reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.guards import check_finite
from defenses.base import register_defense


@dataclass
class FTConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.01
    final_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    label_smoothing: float = 0.0
    train_mode_bn: bool = True

    def __post_init__(self):
        check_finetune_options("ft", self.steps, self.batch_size, self.lr, self.final_lr, self.momentum,
                               self.weight_decay)


def check_finetune_options(name: str, steps: int, batch_size: int, lr: float, final_lr: float, momentum: float,
                           weight_decay: float, min_steps: int = 1) -> None:
    if steps < min_steps or batch_size < 1:
        raise ValueError(f"{name} needs steps >= {min_steps} and batch_size >= 1")
    if lr <= 0 or final_lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
        raise ValueError(f"{name} needs lr > 0, final_lr >= 0, momentum in [0, 1) and weight_decay >= 0")


def finetune(model: nn.Module, task: Any, clean: Any, *, steps: int, batch_size: int, lr: float,
             final_lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 5e-4, augment: bool = True,
             label_smoothing: float = 0.0, train_mode_bn: bool = True, seed: int = 0, where: str = "ft",
             after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """SGD (momentum, weight decay, cosine to ``final_lr``) on all weights for ``steps`` batches drawn with
    replacement from ``clean``. ``after_step`` runs (under no_grad) after every optimiser step, e.g. to keep
    pruned weights at zero. Returns ``{"steps", "loss_trace"}``; leaves the model in eval."""
    if steps == 0:
        model.eval()
        return {"steps": 0, "loss_trace": []}
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=final_lr)
    g = torch.Generator().manual_seed(seed)
    model.train(train_mode_bn)
    losses = []
    for step in range(steps):
        batch = task.sample_batch(clean, batch_size, g, augment=augment)
        loss = task.loss(model, batch, label_smoothing=label_smoothing)
        check_finite(loss, where, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    model.eval()
    return {"steps": steps, "loss_trace": losses}


@register_defense("ft", FTConfig, "fine-tuning baseline (Karim et al., Augmented Neural Fine-Tuning for Efficient "
                                  "Backdoor Purification, ECCV 2024; Liu et al., Fine-Pruning, RAID 2018)")
def ft(model: nn.Module, task: Any, clean: Any, cfg: FTConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    info = finetune(model, task, clean, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                    final_lr=cfg.final_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    augment=cfg.augment, label_smoothing=cfg.label_smoothing, train_mode_bn=cfg.train_mode_bn,
                    seed=seed, where="ft")
    return model, {**info, "clean_samples": task.split_sizes(clean)}
