"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by
Unlearning Shared Adversarial Examples", NeurIPS 2023, arXiv 2307.10562; the first author's implementation is
BackdoorBench's ``defense/sau.py`` with ``config/defense/sau/config.yaml``).

The model is fine-tuned against *shared* adversarial examples: perturbations that send both the model being purified
(``h``) and the frozen original victim (``h_0``) to the same wrong class, the examples the paper shows bound the
backdoor risk. Per clean batch:

1. PGD (L-inf ball of radius ``eps`` in the task's perturbable-input space, one perturbation per sample, both
   models in eval mode) from ``+eps`` everywhere (``pgd_init="max"``), ``pgd_steps`` signed-gradient *descent*
   steps of ``pgd_step_size`` on ``beta_adv * L_adv + beta_shared * L_js``, each step clipped back to the ball:
   ``L_adv = -(sum of CE(h(x + d), y) over samples h still labels as on x, plus the same for h_0) / 2N`` pushes
   both models away from their clean predictions, and ``L_js`` (the sum over not-yet-shared samples of the
   Jensen-Shannon divergence between the two models' softmax outputs, / N) pulls their predictions together. PGD
   stops early once every sample is a shared adversarial example.
2. One Adam step on ``lambda_clean * CE(h(x), y) + lambda_adv * CE(h(x + d), y) + lambda_shared * L_sar``, where
   ``L_sar = -mean over N of log(1 - p_h(y_0 | x + d))`` on the samples whose perturbed ``h_0`` label ``y_0`` differs
   from both the true label and ``h_0``'s clean label (the authors' "potential poison"; their numerically
   clamped two-term form is kept).

Defaults, from BackdoorBench's SAU config and code (its ``ratio`` 0.05, the share of clean training data, is the
runner's clean budget here): 100 epochs (``n_rounds``) over the clean split in batches of 256, shuffled and not
augmented (BackdoorBench builds SAU's loader with the test transform); Adam lr 1e-4, betas (0.9, 0.999), no weight
decay; ``trigger_norm`` (eps) 0.2, L-inf, ``adv_lr`` 0.2, ``adv_steps`` 5, ``pgd_init`` max, ``beta_1`` 0.01,
``beta_2`` 1, ``lmd_1`` 1, ``lmd_2`` 0, ``lmd_3`` 1, ``outer_steps`` 1; the model in eval mode throughout
(``--train_mode`` off); ``x + d`` not clipped to the input range (the authors comment the clip out, as I-BAU does).
For images ``eps`` is in pixel units on [0, 1] (the authors add the perturbation to de-normalised images), so 0.2
is theirs; for other tasks it is in the units of ``task.perturbable_input`` (point coordinates for point clouds)
and should be set for that space.

Deviations: the config's CosineAnnealingLR is never stepped in the authors' loop, so the learning rate is constant
here too; ``outer_steps`` is fixed at its default 1; with ``train_mode`` the clean and perturbed halves are
normalised in separate forward passes (the authors concatenate them in one); the authors' ``min_eps`` / ``max_eps``
arguments are unused there and absent here, as is their ``pgd_init="random"`` (uniform [0, 1) clipped to [0, eps]).

:func:`loss_and_logits` (the task's loss and the logits of the forward it ran) is shared with RNP and AWM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.guards import check_finite
from defenses.base import register_defense

PGD_INITS = ("max", "min", "zero")


@dataclass
class SAUConfig:
    epochs: int = 100  # n_rounds
    batch_size: int = 256
    lr: float = 1e-4  # Adam
    weight_decay: float = 0.0
    augment: bool = False
    eps: float = 0.2  # trigger_norm: L-inf radius, in task.perturbable_input units
    pgd_steps: int = 5  # adv_steps
    pgd_step_size: float = 0.2  # adv_lr
    pgd_init: str = "max"  # max (+eps) | min (-eps) | zero
    beta_adv: float = 0.01  # beta_1
    beta_shared: float = 1.0  # beta_2
    lambda_clean: float = 1.0  # lmd_1
    lambda_adv: float = 0.0  # lmd_2: adversarial training term, off by default
    lambda_shared: float = 1.0  # lmd_3
    train_mode: bool = False  # BN batch statistics in the unlearning forward passes

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.pgd_steps < 0:
            raise ValueError("sau needs epochs >= 1, batch_size >= 1 and pgd_steps >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.eps < 0 or self.pgd_step_size <= 0:
            raise ValueError("sau needs lr > 0, weight_decay >= 0, eps >= 0 and pgd_step_size > 0")
        if self.pgd_init not in PGD_INITS:
            raise ValueError(f"sau pgd_init must be one of {', '.join(PGD_INITS)}, got {self.pgd_init!r}")
        if min(self.beta_adv, self.beta_shared, self.lambda_clean, self.lambda_adv, self.lambda_shared) < 0:
            raise ValueError("sau loss weights (beta_*, lambda_*) must be >= 0")


def loss_and_logits(task: Any, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``task.loss(model, batch)`` and the (float32) logits of the forward pass it ran, caught by a forward hook,
    so the task keeps its own forward (autocast, input layout, auxiliary losses) and the defence gets per-sample
    outputs."""
    caught: list[Tensor] = []
    handle = model.register_forward_hook(lambda _m, _a, out: caught.append(out))
    try:
        loss = task.loss(model, batch)
    finally:
        handle.remove()
    return loss, caught[-1].float()


def js_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per-sample Jensen-Shannon divergence of two softmax outputs (probabilities clamped at 1e-8, as the authors)."""
    p = F.softmax(logits_a, dim=1).clamp(min=1e-8)
    q = F.softmax(logits_b, dim=1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log())).sum(dim=1)


def shared_adversarial_examples(task: Any, model: nn.Module, reference: nn.Module, batch: Any, cfg: SAUConfig
                                ) -> tuple[Tensor, int]:
    """SAU's inner maximisation on ``batch``: per-sample perturbations ``d`` with ``|d|_inf <= eps`` that make
    ``model`` and ``reference`` agree on a label other than their clean ones. Returns ``d`` (detached) and the
    number of PGD steps run. Both models must be in eval mode."""
    x = task.perturbable_input(batch).detach()
    y = batch.targets
    start = {"max": cfg.eps, "min": -cfg.eps, "zero": 0.0}[cfg.pgd_init]
    delta = torch.full_like(x, start)
    with torch.no_grad():
        clean = loss_and_logits(task, model, batch)[1].argmax(1)
        clean_ref = loss_and_logits(task, reference, batch)[1].argmax(1)
    n, steps = len(y), 0
    for steps in range(1, cfg.pgd_steps + 1):
        delta.requires_grad_(True)
        adv = task.with_input(batch, x + delta)
        logits = loss_and_logits(task, model, adv)[1]
        logits_ref = loss_and_logits(task, reference, adv)[1]
        fooled, fooled_ref = logits.argmax(1) != clean, logits_ref.argmax(1) != clean_ref
        shared = fooled & fooled_ref & (logits.argmax(1) == logits_ref.argmax(1))
        ce = F.cross_entropy(logits, y, reduction="none")[~fooled].sum()
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")[~fooled_ref].sum()
        loss_adv = -(ce + ce_ref) / (2 * n)
        loss_js = js_divergence(logits, logits_ref)[~shared].sum() / n
        objective = cfg.beta_adv * loss_adv + cfg.beta_shared * loss_js
        check_finite(objective, "sau pgd", steps)
        (grad,) = torch.autograd.grad(objective, [delta])
        delta = (delta.detach() - cfg.pgd_step_size * grad.sign()).clamp_(-cfg.eps, cfg.eps)
        if bool(shared.all()):
            break
    return delta.detach(), steps


def shared_adversarial_loss(per_logits: Tensor, per_logits_ref: Tensor, clean_logits_ref: Tensor, y: Tensor
                            ) -> tuple[Tensor, Tensor]:
    """``L_sar``: -log(1 - p_h(y_0)) summed over the reference's "potential poison" samples (its perturbed label
    ``y_0`` is neither the true label nor its clean label), / N; also returns that sample mask."""
    y0 = per_logits_ref.argmax(1)
    potential = (y0 != y) & (y0 != clean_logits_ref.argmax(1))
    if not potential.any():
        return per_logits.sum() * 0.0, potential
    p = F.softmax(per_logits, dim=1)
    one_hot = F.one_hot(y0, p.shape[1]).to(p.dtype)
    pos = (p * one_hot).sum(1)[potential]
    neg = (p * (1 - one_hot)).sum(1)[potential]
    loss = -(torch.log(1e-6 + neg.clamp(max=0.999)).sum() + torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
    return loss / len(y), potential


@register_defense("sau", SAUConfig, "Wei et al., Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning "
                                   "Shared Adversarial Examples, NeurIPS 2023")
def sau(model: nn.Module, task: Any, clean: Any, cfg: SAUConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    acc_before = task.accuracy(model, clean)
    steps = pgd_steps = 0
    delta_linf = 0.0
    trace = []
    for epoch in range(cfg.epochs):
        sums = torch.zeros(3)
        batches = seen = shared_count = potential_count = 0
        for batch in task.epoch_batches(clean, cfg.batch_size, g, augment=cfg.augment):
            model.eval()
            delta, ran = shared_adversarial_examples(task, model, reference, batch, cfg)
            pgd_steps += ran
            delta_linf = max(delta_linf, float(delta.abs().max()))
            adv = task.with_input(batch, task.perturbable_input(batch) + delta)
            model.train(cfg.train_mode)
            loss_clean = task.loss(model, batch)
            loss_adv, per_logits = loss_and_logits(task, model, adv)
            model.eval()
            with torch.no_grad():
                clean_logits_ref = loss_and_logits(task, reference, batch)[1]
                per_logits_ref = loss_and_logits(task, reference, adv)[1]
            loss_shared, potential = shared_adversarial_loss(per_logits, per_logits_ref, clean_logits_ref,
                                                             batch.targets)
            loss = cfg.lambda_clean * loss_clean + cfg.lambda_adv * loss_adv + cfg.lambda_shared * loss_shared
            check_finite(loss, "sau", steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            shared_count += int((potential & (per_logits.argmax(1) == per_logits_ref.argmax(1))).sum())
            potential_count += int(potential.sum())
            seen += len(batch.targets)
            batches += 1
            sums += torch.tensor([loss_clean.item(), loss_adv.item(), loss_shared.item()])
        if epoch % 10 == 0 or epoch == cfg.epochs - 1:
            trace.append([epoch, *(round(v, 4) for v in (sums / max(batches, 1)).tolist()),
                          round(shared_count / max(seen, 1), 4)])
    model.eval()
    return model, {
        "epochs": cfg.epochs, "steps": steps, "pgd_steps": pgd_steps,
        "clean_samples": task.split_sizes(clean), "delta_linf": delta_linf,
        "shared_fraction": shared_count / max(seen, 1),  # last epoch: shared adversarial examples before the step
        "potential_poison_fraction": potential_count / max(seen, 1),
        "loss_trace": trace,  # [epoch, clean CE, adversarial CE, L_sar, shared fraction] every 10 epochs
        "clean_acc_before": acc_before, "clean_acc": task.accuracy(model, clean),
    }
