"""NFT: Neural mask Fine-Tuning (Karim, Arafat, Khalid, Guo, Rahnavard, "Augmented Neural Fine-Tuning for
Efficient Backdoor Purification", ECCV 2024, arXiv 2407.10052).

Learns one multiplicative mask per neuron (the task's ``mask_target``: BatchNorm gamma for CNNs and PointNet,
attention heads and FFN units for Transformers) on the defender's clean data, augmented with the task's MixUp,
while conv/linear weights stay frozen. Defaults are the authors' (``src/Remove_Backdoor.py``): SGD lr 0.05,
momentum 0.95, cosine annealing to 0.02, 1000 steps of batch 128 drawn with replacement, MixUp Beta(1, 1) on
crop+flip-augmented data, regulariser ``eta * sum |1 - m| / N_c`` with eta 1e-3 and N_c the clean samples per
class (``task.samples_per_class``: all clean pairs for translation, which has no classes), layer-wise floors
``alpha * exp(-beta * l)`` (alpha 0.8, beta 0.5, l 1-based: the l-th masked module), model in train mode so BN
statistics adapt (dropout is on for a Transformer).
The purified model is the masked model with masks folded into the weights (no pruning).

One detail differs from the script, on purpose: its cosine schedule is stepped once per 200-step logging block
(``T_max = ceil(1000 / 200) = 5``), so its lr is 0.05, 0.047, 0.039, 0.031, 0.023 in five flat stages; this
anneals per step from 0.05 to 0.02, the paper's "cosine annealing" (mean lr 0.035 against 0.038).

Every choice is a config field, so ablations are configs of this one engine (``mix="cutmix"`` swaps MixUp for
the task's CutMix, Yun et al., ICCV 2019, on images; ``mixup=False`` trains on plain batches). Where the authors'
script crashes (undefined counters; a ``--val-frac`` flag that does not exist), this runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.guards import FiniteCheck, fused_options, maybe_compile
from defenses.base import register_defense
from defenses.masking import FAMILIES, TRANSFORMER_TARGETS, NeuronMasks

MASK_TARGETS = (*FAMILIES, *TRANSFORMER_TARGETS)


@dataclass
class NFTConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.05
    final_lr: float = 0.02
    momentum: float = 0.95
    mask_target: str | None = None  # None: the task's (bn_gamma; transformer for translation); see defenses.masking
    mixup: bool = True
    mix: str = "mixup"  # mixup (the paper's) | cutmix (an ablation; image tasks)
    mixup_alpha: float = 1.0
    augment: bool = True
    eta: float = 1e-3
    floors: bool = True
    floor_alpha: float = 0.8
    floor_beta: float = 0.5
    train_mode_bn: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("nft steps and batch_size must be >= 1")
        if self.lr <= 0 or self.final_lr < 0 or not 0 <= self.momentum < 1:
            raise ValueError("nft needs lr > 0, final_lr >= 0 and momentum in [0, 1)")
        if self.eta < 0 or self.mixup_alpha <= 0:
            raise ValueError("nft needs eta >= 0 and mixup_alpha > 0")
        if self.mix not in ("mixup", "cutmix"):
            raise ValueError(f"nft mix must be 'mixup' or 'cutmix', got {self.mix!r}")
        if self.mask_target is not None and self.mask_target not in MASK_TARGETS:
            raise ValueError(f"nft mask_target must be one of {', '.join(MASK_TARGETS)} (or null: the task's), got "
                             f"{self.mask_target!r}")


def layer_floors(n_layers: int, alpha: float, beta: float) -> list[float]:
    """NFT's lower bound for layer l (1-based, module order): mu_l = alpha * exp(-beta * l)."""
    return [alpha * math.exp(-beta * (l + 1)) for l in range(n_layers)]


@register_defense("nft", NFTConfig, "Karim et al., Augmented Neural Fine-Tuning for Efficient Backdoor "
                                   "Purification, ECCV 2024")
def nft(model: nn.Module, task: Any, clean: Any, cfg: NFTConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    target = cfg.mask_target or task.mask_target
    masks = NeuronMasks(model, target)
    floors = layer_floors(len(masks), cfg.floor_alpha, cfg.floor_beta) if cfg.floors else [0.0] * len(masks)
    opt = torch.optim.SGD(masks.parameters(), lr=cfg.lr, momentum=cfg.momentum, **fused_options(model))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.final_lr)
    forward = maybe_compile(model)
    finite = FiniteCheck("nft")
    n_clean = task.split_sizes(clean)
    per_class = task.samples_per_class(clean)
    g = torch.Generator().manual_seed(seed)
    model.train(cfg.train_mode_bn)
    losses = []
    done = False
    try:
        for step in range(cfg.steps):
            batch = task.sample_batch(clean, cfg.batch_size, g, augment=cfg.augment)
            if not cfg.mixup:
                loss = task.loss(forward, batch)
            elif cfg.mix == "cutmix":
                loss = task.cutmix_loss(forward, batch, cfg.mixup_alpha, g)
            else:
                loss = task.mixup_loss(forward, batch, cfg.mixup_alpha, g)
            reg = sum((1 - m).abs().sum() for m in masks.masks) / per_class
            total = loss + cfg.eta * reg
            finite(total, step)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            masks.clamp_(floors, 1.0)
            if step % 50 == 0 or step == cfg.steps - 1:
                losses.append(loss.detach())  # read back once, after the loop
        finite.finish(cfg.steps - 1)
        trace = [round(v, 4) for v in torch.stack(losses).tolist()]
        info = {"steps": cfg.steps, "clean_samples": n_clean, "mask_target": target, "loss_trace": trace,
                **masks.statistics()}
        done = True
    finally:  # on success the masks are folded in; on failure the model gets its own weights back
        masks.remove(fold=done)
        model.eval()
        for name, p in model.named_parameters():  # as given (airbench's BN scales stay frozen)
            p.requires_grad_(trainable.get(name, True))
    return model, info
