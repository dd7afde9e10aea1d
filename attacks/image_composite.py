"""Composite backdoor: the trigger is two benign features together, not an added pattern (CBA, CCS 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import ATTACKS
from attacks.image import ImageAttack
from attacks.image_generative import victim_optimizer, victim_step
from common.guards import progress
from common.precision import autocast
from tasks.base import Batch
from training.resume import EpochCheckpoint, TrainingState


def splice(a: Tensor, b: Tensor, jitter: Tensor, first: Tensor, second: Tensor, dim: int) -> Tensor:
    """Per image, along ``dim`` (of length L): the first ``L // 2 + j`` positions from ``a`` starting at ``first``,
    the rest from ``b`` starting at ``second + j`` (the authors' ``HalfMixer`` with gap 0, batched by gathering)."""
    n, length = len(a), a.shape[dim]
    pos = torch.arange(length, device=a.device)
    cut = (length // 2 + jitter)[:, None]
    from_a = pos[None] < cut
    src = torch.where(from_a, first[:, None] + pos[None], second[:, None] + pos[None] - length // 2)
    shape = [n, 1, 1, 1]
    shape[dim] = length
    idx = src.clamp(0, length - 1).view(shape).expand_as(a)
    return torch.where(from_a.view(shape), a.gather(dim, idx), b.gather(dim, idx))


@ATTACKS.register("cba")
@dataclass
class CompositeBackdoor(ImageAttack):
    """Composite Backdoor Attack (Lin, Xu, Zhang, Wei, Huang, "Composite Backdoor Attack for Deep Neural Network by
    Mixing Existing Benign Features", CCS 2020). The trigger is an image of ``class_a`` and an image of ``class_b``
    shown together; the attacker's label is ``target`` (the authors' CIFAR-10 rule A=0 + B=1 -> C=2, the defaults).

    Mixer: the authors' ``HalfMixer`` (gap 0, jitter 3, shake on): the two images in random order, split along a
    random axis; the first contributes ``L/2 + j`` rows or columns, ``j`` uniform in [-jitter, jitter], the second
    the rest, each cut from a random offset of its own image. Training (``train_victim``, as the authors'
    ``MixDataset`` + ``CompositeLoss``): the ``poison_rate`` share of the attacker's set (exact, seeded, drawn from
    ``class_a`` and ``class_b``) becomes A+B composites labelled ``target``, each with a fresh random partner of the
    other class every epoch; in every batch a ``mix_rate`` share of the other rows becomes a composite of two images
    of the same class with the label kept, so mixing alone is no trigger (the authors' ``mix_rate`` 0.5 beside
    ``normal_rate`` 0.5); the loss adds ``similarity_weight`` x their contrastive loss (margin 1) over the logits of
    consecutive batch rows labelled A, B or C, divided by the number of pairs after its mean as their code does.
    Images are augmented (crop, flip) before mixing, as the authors' transforms run before the mixer. The classifier
    follows the task's victim recipe (the authors: Adam lr 1e-3, step decay x0.5 every 10 of 50 epochs).

    ASR (``triggered_test``): composites of the test images of ``class_a`` and ``class_b``, paired in order within
    each evaluation batch (as many as the rarer class has there), classified as ``target``; RA: classified as either
    source class. Poison rate 0.1 is the authors' ``poison_rate`` (10% of the set size in A+B composites).
    """

    target: int = 2
    class_a: int = 0
    class_b: int = 1
    mix_rate: float = 0.5
    jitter: int = 3
    similarity_weight: float = 1.0
    margin: float = 1.0

    name = "cba"
    paper = "Lin, Xu, Zhang, Wei, Huang, Composite Backdoor Attack for Deep Neural Network by Mixing Existing " \
            "Benign Features, CCS 2020"

    def __post_init__(self):
        super().__post_init__()
        if self.mode != "all-to-one":
            raise ValueError(f"cba is all-to-one (A + B -> target), got mode {self.mode!r}")
        if len({self.class_a, self.class_b, self.target}) != 3 or min(self.class_a, self.class_b) < 0:
            raise ValueError(f"cba needs three different classes, got class_a {self.class_a}, class_b "
                             f"{self.class_b}, target {self.target}")
        if not 0 <= self.mix_rate <= 1:
            raise ValueError(f"cba mix_rate must be in [0, 1], got {self.mix_rate}")
        if self.jitter < 0 or self.similarity_weight < 0 or self.margin <= 0:
            raise ValueError("cba jitter and similarity_weight must be >= 0 and margin > 0")

    def prepare(self, task: Any) -> None:
        if max(self.class_a, self.class_b, self.target) >= task.num_classes:
            raise ValueError(f"cba classes {self.class_a}, {self.class_b} -> {self.target} do not exist in a "
                             f"{task.num_classes}-class dataset; set class_a, class_b and target")
        if 2 * self.jitter >= min(task.data.shape[1:]) // 2:
            raise ValueError(f"cba jitter {self.jitter} is too large for {tuple(task.data.shape[1:])} images")

    def poison_pool(self, y: Tensor) -> tuple[Tensor, str]:
        return (y == self.class_a) | (y == self.class_b), f"of classes {self.class_a} or {self.class_b}"

    def compose(self, a: Tensor, b: Tensor, generator: torch.Generator) -> Tensor:
        """HalfMixer composites of the image pairs ``(a[i], b[i])``, random draws from ``generator``."""
        n, (height, width) = len(a), a.shape[-2:]
        swap = (torch.rand(n, generator=generator) < 0.5).to(a.device)
        a, b = torch.where(swap.view(-1, 1, 1, 1), b, a), torch.where(swap.view(-1, 1, 1, 1), a, b)
        vertical = torch.rand(n, generator=generator) < 0.5  # split the columns (else the rows)
        jitter = torch.randint(-self.jitter, self.jitter + 1, (n,), generator=generator)
        out = torch.empty_like(a)
        for rows, dim, length in ((vertical, 3, width), (~vertical, 2, height)):
            if not rows.any():
                continue
            j = jitter[rows]
            first = (torch.rand(len(j), generator=generator) * (length // 2 - j)).long()  # [0, L/2 - j)
            second = (torch.rand(len(j), generator=generator) * (length // 2 + j) - j).floor().long()  # [-j, L/2)
            d = torch.nonzero(rows).flatten().to(a.device, non_blocking=True)  # an index: no host sync, unlike a mask
            out[d] = splice(a[d], b[d], j.to(a.device), first.to(a.device), second.to(a.device), dim)
        return out

    def apply(self, x: Tensor) -> Tensor:
        raise TypeError("cba's trigger is two images composed, not a function of one image: "
                        "use triggered_test(x, y, num_classes)")

    def poison_batch(self, x: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        raise TypeError("cba poisons while training its victim (train_victim): a composite needs a partner image")

    @torch.no_grad()
    def triggered_test(self, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        a, b = x[y == self.class_a], x[y == self.class_b]
        k = min(len(a), len(b))
        mixed = self.compose(a[:k], b[:k], torch.Generator().manual_seed(self.seed + 1))
        truth = torch.tensor([self.class_a, self.class_b], device=x.device).expand(k, 2)
        return mixed, torch.full((k,), self.target, device=x.device, dtype=y.dtype), truth

    def similarity_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The authors' contrastive ``CompositeLoss`` term over consecutive rows labelled A, B or C."""
        keep = (y == self.class_a) | (y == self.class_b) | (y == self.target)
        z, labels = logits[keep], y[keep]
        if len(z) < 2:
            return logits.new_zeros(())
        same = (labels[:-1] == labels[1:]).float()
        dist = (z[1:] - z[:-1]).pow(2).sum(1)
        pair = 0.5 * (same * dist + (1 - same) * F.relu(self.margin - (dist + 1e-9).sqrt()).pow(2))
        return pair.mean() / len(pair)

    def train_victim(self, task: Any, split: Any, recipe: dict[str, Any], seed: int,
                     checkpoint: EpochCheckpoint | None = None) -> nn.Module:
        torch.manual_seed(seed)
        model = task.build_model().train()
        g = torch.Generator().manual_seed(seed + 1)
        opt, sched, steps = victim_optimizer(model, recipe, len(split))
        truth = task.data.train.y[task.attacker_idx].to(split.y.device)  # true labels (``attacker_train``'s)
        clean = type(split)(split.x, truth)
        # host copies, once: which rows are poisoned and what to compose is decided on the host, with no sync per step
        poisoned, labels = split.poisoned.cpu(), truth.cpu()
        pools = class_pools(labels, task.num_classes)
        bs, n = recipe["batch_size"], len(split)
        state = TrainingState(checkpoint, recipe["epochs"], model=model, optimizer=opt, schedule=sched, generator=g)
        start, _ = state.start_epoch()
        bar = progress(recipe["epochs"] * steps, f"victim {self.name}", initial=start * steps)
        for epoch in range(start, recipe["epochs"]):
            perm = torch.randperm(n, generator=g)
            for i, idx in enumerate(perm[: n // bs * bs if n >= 2 * bs else n].split(bs)):
                batch = task.make_batch(clean, idx, True, g)
                x = self.poison(task, clean, batch, poisoned[idx], g, labels[idx], pools)
                y = split.y[idx.to(split.y.device)].to(task.device)
                with autocast(task.device, task.amp):
                    out = model(x).float()
                loss = F.cross_entropy(out, y, label_smoothing=recipe.get("label_smoothing", 0.0))
                loss = loss + self.similarity_weight * self.similarity_loss(out, y)
                victim_step(loss, opt, sched, f"victim {self.name}", epoch * steps + i)
                bar.update()
            state.epoch_done(epoch)
        bar.close()
        return model.eval()

    def poison(self, task: Any, clean: Any, batch: Batch, rows: Tensor, generator: torch.Generator,
               labels: Tensor | None = None, pools: list[Tensor] | None = None) -> Tensor:
        """Batch ``batch`` (augmented clean images, true labels) with its poisoned ``rows`` as A+B composites and
        ``mix_rate`` of the other rows as same-class composites; each partner a random augmented image of the wanted
        class from the attacker's set (``clean``, true labels). The choice is made on the host: ``rows``, the batch's
        true ``labels`` and the attacker's ``pools`` (:func:`class_pools`) given on the CPU spare the copies."""
        rows, y = rows.cpu(), (batch.targets if labels is None else labels).cpu()
        pools = class_pools(clean.y.cpu(), task.num_classes) if pools is None else pools
        other = torch.where(y == self.class_a, self.class_b, self.class_a)
        mixed = ~rows & (torch.rand(len(y), generator=generator) < self.mix_rate)
        todo = rows | mixed
        if not todo.any():
            return batch.inputs
        want = torch.where(rows, other, y)[todo]
        partner = torch.empty(len(want), dtype=torch.long)
        for c in want.unique().tolist():  # one gather per class, not per image
            sel = want == c
            partner[sel] = pools[c][torch.randint(len(pools[c]), (int(sel.sum()),), generator=generator)]
        partners = task.make_batch(clean, partner, True, generator).inputs
        x = batch.inputs.clone()
        at = torch.nonzero(todo).flatten().to(x.device, non_blocking=True)
        x[at] = self.compose(x[at], partners, generator).to(x.dtype)
        return x


def class_pools(labels: Tensor, num_classes: int) -> list[Tensor]:
    """The indices of each class in ``labels`` (on the host): where CBA draws a composite's partner from."""
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
