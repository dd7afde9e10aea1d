"""ANP: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021, arXiv 2110.14430; authors' code ``csdongxian/ANP_backdoor``,
``optimize_mask_cifar.py`` and ``prune_neuron_cifar.py``).

Mask optimisation (``optimize_mask_cifar.py``). Every BatchNorm channel gets a mask ``m`` (init 1)
and two perturbations: ``delta`` on the mask and ``xi`` on the bias, so a perturbed BN computes
``gamma * (m + delta) * x_hat + beta * (1 + xi)``. Each iteration draws a batch of 128 with
replacement from the defender's clean split, augmented as in training (the authors' clean set is a
split of CIFAR-10 train with its ``RandomCrop(32, 4) + RandomHorizontalFlip`` transform; here the
task's own crop+flip), then

1. resets ``delta`` and ``xi`` uniform in ``[-eps, eps]`` and takes ``steps`` sign-gradient ascent
   steps of size ``eps / steps`` on the CE loss (no projection back onto the eps-ball: the authors'
   code has none either, so with one step a perturbation can reach ``2 * eps``);
2. minimises ``alpha * CE(no perturbation) + (1 - alpha) * CE(perturbed)`` over the masks with SGD
   (lr 0.2, momentum 0.9) and clamps the masks to ``[0, 1]``.

Defaults are the authors': eps 0.4, steps 1, alpha 0.2, lr 0.2, momentum 0.9, 2000 iterations of
batch 128. Like the authors (``mask_train`` calls ``model.train()``) the model is in train mode, so
every pass normalises with batch statistics; the authors then prune a freshly loaded checkpoint, so
the BN running statistics that train mode updated are discarded: this restores them. Every BN layer
is masked, the stem BN included (the authors build the whole network with ``NoisyBatchNorm2d``),
unlike NFT, which leaves the stem out. With ``eps == 0`` the perturbed term is dropped, as in the
authors' code.

Pruning (``prune_neuron_cifar.py``). Neurons are sorted by mask value (ascending, ties in module
order) and a pruned neuron gets BN weight 0 in the *original* model (the learned soft mask values are
not kept: surviving neurons are left exactly as trained). ``prune_by``:

- ``"threshold"`` (default): prune masks ``<= prune_value`` (0.2; the authors' comparison is ``<=``);
- ``"number"``: prune the ``prune_value`` lowest masks; ``"fraction"``: that share of all masked neurons;
- ``"clean_acc"``: a clean-data-only rule of this suite: walk the authors' threshold grid
  (0, 0.05, ..., 0.9) and keep the largest threshold before the defender's clean-split accuracy first
  drops more than ``acc_tolerance`` (absolute) below the unpruned model's clean-split accuracy. The
  clean split is also what the masks were trained on, so this accuracy is optimistic.

Other neurons: the masks go on the task's ``mask_target`` (``defenses/masking.py``; BN gamma for CNNs and
PointNet). For a Transformer (translation: attention heads and FFN units) a mask scales a neuron's weights and
bias together, so ``delta`` perturbs the neuron's whole output and ``xi`` has no bias left to act on; pruning
zeroes what the mask scales (an FFN unit's row and bias, a head's value rows and bias).

The authors' script (and BackdoorBench) report every threshold against the poisoned *test* set and
pick the one with the lowest ASR; that needs test data the defender does not have, and is
deliberately not implemented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from common.guards import FiniteCheck, fused_options, maybe_compile
from defenses.base import register_defense
from defenses.masking import MaskedLayer, NeuronMasks

PRUNE_RULES = ("threshold", "number", "fraction", "clean_acc")


@dataclass
class ANPConfig:
    iterations: int = 2000
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    eps: float = 0.4  # anp_eps: perturbation budget on masks and biases
    steps: int = 1  # anp_steps: sign-gradient ascent steps, each of size eps / steps
    alpha: float = 0.2  # anp_alpha: weight of the unperturbed loss
    augment: bool = True
    train_mode_bn: bool = True
    include_stem: bool = True  # mask every BN, as the authors; False: the model's mask_exclude (NFT's set)
    prune_by: str = "threshold"  # threshold | number | fraction | clean_acc
    prune_value: float = 0.2  # threshold, neuron count or fraction (unused by clean_acc)
    acc_tolerance: float = 0.02  # clean_acc: largest allowed drop of clean-split accuracy
    search_max: float = 0.9  # clean_acc: the authors' threshold grid (pruning_max, pruning_step)
    search_step: float = 0.05

    def __post_init__(self):
        if self.iterations < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("anp iterations, batch_size and steps must be >= 1")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.eps < 0 or not 0 <= self.alpha <= 1:
            raise ValueError("anp needs lr > 0, momentum in [0, 1), eps >= 0 and alpha in [0, 1]")
        if self.prune_by not in PRUNE_RULES:
            raise ValueError(f"anp prune_by must be one of {', '.join(PRUNE_RULES)}, got {self.prune_by!r}")
        if self.prune_by == "number" and (self.prune_value < 0 or self.prune_value != int(self.prune_value)):
            raise ValueError(f"anp prune_by number needs a whole prune_value >= 0, got {self.prune_value}")
        if self.prune_by == "fraction" and not 0 <= self.prune_value <= 1:
            raise ValueError(f"anp prune_by fraction needs prune_value in [0, 1], got {self.prune_value}")
        if self.prune_by == "clean_acc" and (self.acc_tolerance < 0 or self.search_step <= 0):
            raise ValueError("anp clean_acc needs acc_tolerance >= 0 and search_step > 0")


def adversarial_noise(task: Any, model: nn.Module, masks: NeuronMasks, batch: Any, eps: float, steps: int,
                      generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """ANP's inner maximisation: ``delta`` (masks) and ``xi`` (biases) that raise the loss on ``batch``.

    Both start uniform in ``[-eps, eps]`` (one draw and one copy to the device for all layers, the same numbers as
    a draw per tensor in turn) and take ``steps`` steps of ``eps / steps`` along the sign of the gradient; the noise
    is cleared from the model on return.
    """
    sizes = [m.numel() for m in masks.masks] * 2
    noise = ((torch.rand(sum(sizes), generator=generator) * 2 - 1) * eps).to(masks.masks[0].device, non_blocking=True)
    parts = [t.view_as(m) for t, m in zip(noise.split(sizes), [*masks.masks, *masks.masks], strict=True)]
    delta, xi = parts[: len(masks.masks)], parts[len(masks.masks):]
    size = eps / max(steps, 1)
    try:
        for _ in range(steps):
            leaves = [t.detach().requires_grad_(True) for t in delta + xi]
            delta, xi = leaves[: len(delta)], leaves[len(delta):]
            masks.set_noise(delta, xi)
            grads = torch.autograd.grad(task.loss(model, batch), leaves, materialize_grads=True)  # xi may be unused
            moved = [(t + size * g.sign()).detach() for t, g in zip(leaves, grads, strict=True)]
            delta, xi = moved[: len(delta)], moved[len(delta):]
    finally:
        masks.set_noise(None, None)
    return delta, xi


def optimize_masks(model: nn.Module, task: Any, clean: Any, cfg: ANPConfig, seed: int = 0,
                   on_step: Callable[[int, NeuronMasks], None] | None = None) -> tuple[NeuronMasks, dict[str, Any]]:
    """ANP's mask optimisation on ``model`` (whose parameters the caller has frozen); masks stay attached."""
    masks = NeuronMasks(model, task.mask_target, exclude=() if cfg.include_stem else None, bias_noise=True)
    opt = torch.optim.SGD(masks.parameters(), lr=cfg.lr, momentum=cfg.momentum, **fused_options(model))
    g = torch.Generator().manual_seed(seed)
    model.train(cfg.train_mode_bn)
    forward = maybe_compile(model)
    finite = FiniteCheck("anp")
    losses = []
    for it in range(cfg.iterations):
        batch = task.sample_batch(clean, cfg.batch_size, g, augment=cfg.augment)
        if cfg.eps > 0:
            delta, xi = adversarial_noise(task, forward, masks, batch, cfg.eps, cfg.steps, g)
            masks.set_noise(delta, xi)
            loss_rob = task.loss(forward, batch)
            masks.set_noise(None, None)
        else:
            loss_rob = torch.zeros((), device=task.device)
        loss_nat = task.loss(forward, batch)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
        finite(loss, it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        masks.clamp_(0.0, 1.0)
        if on_step is not None:
            on_step(it, masks)
        if it % 100 == 0 or it == cfg.iterations - 1:
            losses.append(torch.stack([loss_nat.detach(), loss_rob.detach()]))  # read back once, after the loop
    finite.finish(cfg.iterations - 1)
    losses = [[round(v, 4) for v in pair] for pair in torch.stack(losses).tolist()]
    per_iter_fwd, per_iter_bwd = (cfg.steps + 2, cfg.steps + 1) if cfg.eps > 0 else (1, 1)
    info = {
        "iterations": cfg.iterations, "clean_samples": task.split_sizes(clean),
        "mask_forward_passes": cfg.iterations * per_iter_fwd, "mask_backward_passes": cfg.iterations * per_iter_bwd,
        "mask_forward_samples": cfg.iterations * per_iter_fwd * cfg.batch_size,
        "loss_trace": losses,  # [unperturbed CE, perturbed CE] every 100 iterations
    }
    return masks, info


@torch.no_grad()
def prune_neurons(modules: list[nn.Module], neurons: list[tuple[float, int, int]]) -> None:
    """Set the BN weight of each ``(value, layer, channel)`` neuron to 0 (the authors' ``pruning``)."""
    for _, layer, channel in neurons:
        modules[layer].weight[channel] = 0.0


def prune_masked(layers: list[MaskedLayer], neurons: list[tuple[float, int, int]]) -> None:
    """Zero each ``(value, layer, channel)`` neuron as its mask target defines it (a BN gamma: the authors'
    ``pruning``; an FFN unit's row and bias; an attention head's value rows and bias)."""
    for _, layer, channel in neurons:
        layers[layer].zero(channel)


@register_defense("anp", ANPConfig, "Wu & Wang, Adversarial Neuron Pruning Purifies Backdoored Deep Models, "
                                   "NeurIPS 2021")
def anp(model: nn.Module, task: Any, clean: Any, cfg: ANPConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    grad_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    masks = None
    try:
        masks, info = optimize_masks(model, task, clean, cfg, seed)
        info.update(masks.statistics())
        layers = list(masks.layers)
        names = [layer.name for layer in layers]
        values = [layer.mask.detach().float().cpu() for layer in layers]
    finally:
        if masks is not None:
            masks.remove(fold=False)  # the original weights; pruning below is the only change
        with torch.no_grad():
            for name, b in model.named_buffers():  # BN running statistics as trained (train mode moved them)
                b.copy_(buffers[name])
        model.eval()
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)

    # ascending by mask value; Python's sort is stable, so ties keep module order as in the authors' file
    order = sorted(((float(v), l, c) for l, vals in enumerate(values) for c, v in enumerate(vals.tolist())),
                   key=lambda n: n[0])
    acc_before = task.accuracy(model, clean)
    search = []
    if cfg.prune_by == "threshold":
        threshold = cfg.prune_value
        pruned = [n for n in order if n[0] <= threshold]
    elif cfg.prune_by in ("number", "fraction"):
        count = int(cfg.prune_value) if cfg.prune_by == "number" else round(cfg.prune_value * len(order))
        pruned = order[: min(count, len(order))]
        threshold = pruned[-1][0] if pruned else None
    else:  # clean_acc: nested prunings along the threshold grid, on the defender's clean split only
        originals = [{t: getattr(layer.module, t).detach().clone() for t in layer.tensors} for layer in layers]
        grid = torch.arange(0, cfg.search_max + cfg.search_step / 2, cfg.search_step).tolist()
        threshold, pruned, done = None, [], 0
        for t in grid:
            step = [n for n in order[done:] if n[0] <= t]
            prune_masked(layers, step)
            done += len(step)
            acc = task.accuracy(model, clean)
            search.append([round(t, 4), done, round(acc, 4)])
            if acc < acc_before - cfg.acc_tolerance:
                break
            threshold, pruned = t, order[:done]
        with torch.no_grad():
            for layer, saved in zip(layers, originals, strict=True):
                for t, w in saved.items():
                    getattr(layer.module, t).copy_(w)
    prune_masked(layers, pruned)
    per_layer: dict[str, int] = {}
    for _, l, _ in pruned:
        per_layer[names[l]] = per_layer.get(names[l], 0) + 1
    info.update({
        "prune_by": cfg.prune_by, "threshold": threshold, "neurons_pruned": len(pruned),
        "neurons_masked": len(order), "pruned_per_layer": per_layer,
        "clean_split_acc_unpruned": acc_before, "clean_split_acc": task.accuracy(model, clean),
    })
    if search:
        info["threshold_search"] = search  # [threshold, neurons pruned, clean-split accuracy]
    return model, info
