"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023, arXiv 2305.14876; authors' code ``bboylyg/RNP``, ``main.py``; BackdoorBench's
``defense/rnp.py`` is a port of it).

1. Unlearning: a copy of the model is trained by gradient *ascent* on the clean split's cross-entropy (SGD lr
   0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 10 and 20, model in train mode) for at most 20 epochs,
   stopping after the first epoch whose running accuracy on its own (augmented, train-mode) batches is
   ``<= clean_threshold`` (0.2): the authors' ``train_acc <= args.clean_threshold``.
2. Recovering: on the unlearned copy (weights frozen), one mask per BatchNorm channel (``weight * m``, bias left
   as is, the authors' ``MaskBatchNorm2d``; every BN, the stem included), init 1, is trained to *minimise*
   ``alpha * CE`` (alpha 0.2) on the clean split with SGD lr 0.2, momentum 0.9, for 20 epochs in train mode,
   clamped to [0, 1] after each step. Backdoor neurons, which the unlearning left intact, are not needed to
   restore clean accuracy and end with low masks.
3. Pruning: the *original* model's BN weight is set to 0 for every neuron whose recovered mask is ``<= 0.2``
   (``prune_by="threshold"``; ``"number"`` prunes the ``prune_value`` lowest masks), ties in module order, as ANP
   (``defenses/anp.py``, whose pruning this reuses). The surviving neurons are left exactly as trained.

Defaults are the authors' (``main.py`` argparse, identical in BackdoorBench): batch 128 from the clean split,
shuffled, with the training crop+flip augmentation (their clean loader's ``RandomCrop(32, 4) +
RandomHorizontalFlip``; here the task's own augmentation), ``unlearning_lr`` 0.01, ``schedule`` [10, 20],
``clean_threshold`` 0.2, ``unlearning_epochs`` 20 (BackdoorBench runs 20; the authors' loop ``range(0, 21)`` allows
21), ``recovering_lr`` 0.2, ``recovering_epochs`` 20, ``alpha`` 0.2.

Deviations:
- The pruning threshold is fixed: the authors (and BackdoorBench) sweep thresholds 0, 0.05, ..., 0.9 and report
  each against the poisoned *test* set (BackdoorBench keeps the lowest-ASR model within 10% of the clean test
  accuracy); that selection needs test data and is not implemented. 0.2 is the threshold at which the example
  log in the authors' README removes the backdoor, and ANP's default.
- No gradient clipping: the authors call ``clip_grad_norm_(max_norm=20)`` before ``backward()``, where it clips
  the already-zeroed gradients, i.e. it has no effect.
- An epoch is ``task.epoch_batches``: the last partial batch is dropped when the split holds two or more batches.
- If the threshold is never reached, the last unlearned state is used (as BackdoorBench; the authors' script would
  fail to find its checkpoint); ``info["unlearn_reached_threshold"]`` says which.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.guards import check_finite
from defenses.anp import prune_neurons
from defenses.base import register_defense
from defenses.masking import NeuronMasks
from defenses.sau import loss_and_logits

PRUNE_RULES = ("threshold", "number")


@dataclass
class RNPConfig:
    batch_size: int = 128
    augment: bool = True
    unlearn_epochs: int = 20
    unlearn_lr: float = 0.01
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 5e-4
    unlearn_milestones: tuple[int, ...] = (10, 20)  # lr x 0.1 after these epochs
    clean_threshold: float = 0.2  # stop unlearning once the running clean accuracy is <= this
    recover_epochs: int = 20
    recover_lr: float = 0.2
    recover_momentum: float = 0.9
    alpha: float = 0.2  # weight of the recovering loss
    include_stem: bool = True  # mask every BN, as the authors; False: the model's mask_exclude (NFT's set)
    prune_by: str = "threshold"  # threshold | number
    prune_value: float = 0.2

    def __post_init__(self):
        if self.batch_size < 1 or self.unlearn_epochs < 1 or self.recover_epochs < 1:
            raise ValueError("rnp needs batch_size, unlearn_epochs and recover_epochs >= 1")
        if self.unlearn_lr <= 0 or self.recover_lr <= 0 or self.alpha <= 0 or self.unlearn_weight_decay < 0:
            raise ValueError("rnp needs unlearn_lr, recover_lr, alpha > 0 and unlearn_weight_decay >= 0")
        if not (0 <= self.unlearn_momentum < 1 and 0 <= self.recover_momentum < 1):
            raise ValueError("rnp momenta must be in [0, 1)")
        if not 0 <= self.clean_threshold <= 1:
            raise ValueError(f"rnp clean_threshold must be in [0, 1], got {self.clean_threshold}")
        if self.prune_by not in PRUNE_RULES:
            raise ValueError(f"rnp prune_by must be one of {', '.join(PRUNE_RULES)}, got {self.prune_by!r}")
        if self.prune_by == "number" and (self.prune_value < 0 or self.prune_value != int(self.prune_value)):
            raise ValueError(f"rnp prune_by number needs a whole prune_value >= 0, got {self.prune_value}")


def unlearn(model: nn.Module, task: Any, clean: Any, cfg: RNPConfig, g: torch.Generator) -> dict[str, Any]:
    """RNP's unlearning stage, in place on ``model``: gradient ascent until an epoch's running clean accuracy is
    ``<= cfg.clean_threshold`` or ``cfg.unlearn_epochs`` have run."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.unlearn_lr, momentum=cfg.unlearn_momentum,
                          weight_decay=cfg.unlearn_weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.unlearn_milestones), gamma=0.1)
    model.train()
    steps, trace, acc = 0, [], 1.0
    for _ in range(cfg.unlearn_epochs):
        correct = seen = 0
        for batch in task.epoch_batches(clean, cfg.batch_size, g, augment=cfg.augment):
            loss, logits = loss_and_logits(task, model, batch)
            check_finite(loss, "rnp unlearning", steps)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            opt.step()
            steps += 1
            correct += int((logits.argmax(1) == batch.targets).sum())
            seen += len(batch.targets)
        sched.step()
        acc = correct / max(seen, 1)
        trace.append(round(acc, 4))
        if acc <= cfg.clean_threshold:
            break
    return {"unlearn_epochs_run": len(trace), "unlearn_steps": steps, "unlearn_acc": acc,
            "unlearn_reached_threshold": acc <= cfg.clean_threshold, "unlearn_acc_trace": trace}


def recover(model: nn.Module, task: Any, clean: Any, cfg: RNPConfig, g: torch.Generator
            ) -> tuple[NeuronMasks, dict[str, Any]]:
    """RNP's recovering stage: BN masks on ``model`` (whose parameters the caller has frozen) minimising
    ``alpha * CE``; the masks stay attached."""
    masks = NeuronMasks(model, "bn_gamma", exclude=() if cfg.include_stem else None)
    opt = torch.optim.SGD(masks.parameters(), lr=cfg.recover_lr, momentum=cfg.recover_momentum)
    model.train()
    steps, trace = 0, []
    for _ in range(cfg.recover_epochs):
        for batch in task.epoch_batches(clean, cfg.batch_size, g, augment=cfg.augment):
            loss = cfg.alpha * task.loss(model, batch)
            check_finite(loss, "rnp recovering", steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            masks.clamp_(0.0, 1.0)
            steps += 1
        trace.append(round(loss.item() / cfg.alpha, 4))
    return masks, {"recover_steps": steps, "recover_loss_trace": trace}


@register_defense("rnp", RNPConfig, "Li et al., Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023")
def rnp(model: nn.Module, task: Any, clean: Any, cfg: RNPConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    g = torch.Generator().manual_seed(seed)
    unlearned = copy.deepcopy(model)
    info = unlearn(unlearned, task, clean, cfg, g)
    info["unlearned_clean_split_acc"] = task.accuracy(unlearned, clean)
    for p in unlearned.parameters():
        p.requires_grad_(False)
    masks, recovered = recover(unlearned, task, clean, cfg, g)
    info.update(recovered)
    info.update(masks.statistics())
    names = [layer.name for layer in masks.layers]
    values = [layer.mask.detach().float().cpu() for layer in masks.layers]
    del unlearned, masks

    # ascending by mask value; the sort is stable, so ties keep module order
    order = sorted(((float(v), l, c) for l, vals in enumerate(values) for c, v in enumerate(vals.tolist())),
                   key=lambda n: n[0])
    if cfg.prune_by == "threshold":
        pruned, threshold = [n for n in order if n[0] <= cfg.prune_value], cfg.prune_value
    else:
        pruned = order[: int(cfg.prune_value)]
        threshold = pruned[-1][0] if pruned else None
    model.eval()
    acc_before = task.accuracy(model, clean)
    prune_neurons([model.get_submodule(name) for name in names], pruned)
    per_layer: dict[str, int] = {}
    for _, l, _ in pruned:
        per_layer[names[l]] = per_layer.get(names[l], 0) + 1
    info.update({
        "steps": info["unlearn_steps"] + info["recover_steps"],
        "clean_samples": task.split_sizes(clean),
        "prune_by": cfg.prune_by, "threshold": threshold, "neurons_pruned": len(pruned), "neurons_masked": len(order),
        "pruned_per_layer": per_layer,
        "clean_split_acc_unpruned": acc_before, "clean_split_acc": task.accuracy(model, clean),
    })
    return model, info
