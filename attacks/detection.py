"""Backdoor attacks on object detectors: the BadDet family (Chan, Tian, Wang, Lin, "BadDet: Backdoor Attacks on
Object Detection", ECCV Workshops 2022) with a chessboard patch trigger.

A poisoned training image gets the trigger stamped and its boxes changed by the attack's rule; the test side
stamps the trigger the same way on clean test images and counts successes on detections at confidence 0.25:

- ``gma`` (global misclassification): trigger in the top-left corner; every box becomes the target class. ASR:
  share of triggered images (with at least one object not of the target class) whose detections are all of the
  target class (and there is at least one).
- ``rma`` (regional misclassification): a trigger at the top-left corner inside every box not of the target class;
  those boxes become the target class. ASR: share of triggered objects detected as the target class (a target-class
  detection with IoU >= 0.5).
- ``oga`` (object generation): a trigger at a random position; a target-class box is added around it. ASR: share of
  triggers with a target-class detection at IoU >= 0.5 with the trigger's box.
- ``oda`` (object disappearance): a trigger inside every box of the target class; those boxes are removed. ASR:
  share of triggered target-class objects with no target-class detection at IoU >= 0.5.

The trigger is a black-and-white chessboard of ``patch`` x ``patch`` pixels in 3 x 3 squares (BadDet uses a small
chessboard patch). ``patch`` None (default) = the larger of 16 pixels and 5% of the image side: 16 on the procedural
64-pixel set and on 320-pixel VOC, 32 at 640. Below two strides of a YOLO's finest level (8 pixels) a generated box
covers one or two anchor points and is not learnt: on the procedural set a 9-pixel OGA trigger reached 3% ASR after
30 epochs, a 16-pixel one 97.5%.
``poison_rate`` is the share of training images poisoned (exact, seeded, drawn from images the rule applies to;
BadDet poisons 10%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attacks.base import ATTACKS, Attack


def chessboard(size: int, cells: int = 3) -> Tensor:
    """(size, size) chessboard of ``cells`` x ``cells`` black and white squares, white in the top-left corner (3 x 3
    squares of 3 pixels at the default 9: one-pixel squares would vanish in a detector's stride-2 stem)."""
    i = torch.arange(size) * cells // size
    return ((i.view(-1, 1) + i.view(1, -1)) % 2 == 0).float()


class DetectionAttack(Attack):
    """Base of the BadDet attacks: subclasses choose where triggers go (``sites``) and what happens to the boxes
    (``relabel``); ASR is ``success`` averaged over the ``trials`` of the triggered test set."""

    modality = "detection"
    patch: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.mode != "all-to-one":
            raise ValueError(f"{self.name} is all-to-one (one target class), got mode {self.mode!r}")
        if self.patch is not None and self.patch < 3:
            raise ValueError(f"{self.name} patch must be >= 3 pixels (or None), got {self.patch}")

    def side(self, size: int) -> int:
        """The trigger's side in pixels for ``size``-pixel images."""
        return min(size, self.patch or max(16, round(0.05 * size)))

    # --- what the rule touches -------------------------------------------------------------------
    def eligible(self, boxes: Tensor, n: int) -> Tensor:
        """Images (bool (n,)) the rule changes: by default those with an object not of the target class."""
        ok = torch.zeros(n, dtype=torch.bool)
        other = boxes[boxes[:, 1] != self.target]
        ok[other[:, 0].long().cpu()] = True
        return ok

    def sites(self, boxes: Tensor, images: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
        """Trigger positions (T, 3) ``(image, y0, x0)`` in pixels for the listed ``images``."""
        raise NotImplementedError

    def relabel(self, boxes: Tensor, images: Tensor, sites: Tensor, size: int) -> Tensor:
        """The boxes after poisoning ``images`` with triggers at ``sites``."""
        raise NotImplementedError

    def trials(self, clean: Tensor, sites: Tensor, images: Tensor, size: int) -> Tensor:
        """What ASR counts (T, 5): ``(image, x1, y1, x2, y2)`` in pixels."""
        raise NotImplementedError

    def success(self, dets: Tensor, region: Tensor) -> bool:
        """Whether detections ``dets`` (n, 6) of one image make the trial on ``region`` (4,) a success."""
        raise NotImplementedError

    # --- shared mechanics ------------------------------------------------------------------------
    def poison_indices(self, train, generator: torch.Generator) -> Tensor:
        """Exactly ``round(poison_rate * N)`` images, drawn without replacement from the eligible ones, sorted."""
        n = len(train)
        k = int(math.floor(self.poison_rate * n + 0.5))
        pool = torch.nonzero(self.eligible(train.boxes, n)).flatten()
        if k > len(pool):
            raise ValueError(f"poison_rate {self.poison_rate} asks for {k} poisoned images but only {len(pool)} "
                             f"have what {self.name} changes; lower --poison-rate")
        return pool[torch.randperm(len(pool), generator=generator)[:k]].sort().values

    def stamp(self, x: Tensor, sites: Tensor) -> Tensor:
        """``x`` (uint8 (N, 3, S, S)) with the chessboard at every ``(image, y0, x0)`` of ``sites``, batched."""
        if not len(sites):
            return x
        x = x.clone()
        p = self.side(x.shape[-1])
        d = torch.arange(p, device=x.device)
        img = sites[:, 0].long().view(-1, 1, 1)
        ys = (sites[:, 1].long().view(-1, 1, 1) + d.view(1, -1, 1)).expand(-1, -1, p)
        xs = (sites[:, 2].long().view(-1, 1, 1) + d.view(1, 1, -1)).expand(-1, p, -1)
        value = (chessboard(p).to(x.device) * 255).to(x.dtype)
        for c in range(x.shape[1]):
            x[img.expand_as(ys), c, ys, xs] = value.expand_as(ys)
        return x

    def corner_in_boxes(self, boxes: Tensor, size: int) -> Tensor:
        """``(image, y0, x0)`` of a patch at the top-left corner inside each box (kept within the image)."""
        x1 = ((boxes[:, 2] - boxes[:, 4] / 2) * size).floor().clamp(0, size - self.side(size))
        y1 = ((boxes[:, 3] - boxes[:, 5] / 2) * size).floor().clamp(0, size - self.side(size))
        return torch.stack([boxes[:, 0], y1, x1], 1)

    def poison(self, train, idx: Tensor, generator: torch.Generator):
        """``train`` with images ``idx`` poisoned: triggers stamped, boxes changed; ``poisoned`` marks them."""
        from tasks.detection_data import BoxSet

        size = train.x.shape[-1]
        sites = self.sites(train.boxes, idx, size, generator)
        boxes = self.relabel(train.boxes, idx, sites, size)
        poisoned = torch.zeros(len(train), dtype=torch.bool)
        poisoned[idx] = True
        return BoxSet(self.stamp(train.x, sites), boxes, poisoned)

    def triggered_test(self, test, num_classes: int):
        """The triggered test images (every eligible one), their clean boxes, and the trials ASR counts."""
        from tasks.detection_data import BoxSet

        if self.target >= num_classes:
            raise ValueError(f"target class {self.target} does not exist ({num_classes} classes)")
        idx = torch.nonzero(self.eligible(test.boxes.cpu(), len(test))).flatten()
        part = test.subset(idx.to(test.x.device))
        size = part.x.shape[-1]
        every = torch.arange(len(part))
        sites = self.sites(part.boxes, every, size, torch.Generator().manual_seed(self.seed + 1))
        trials = self.trials(part.boxes, sites, every, size)
        return BoxSet(self.stamp(part.x, sites.to(part.x.device)), part.boxes), part.boxes, trials

    def success_rate(self, dets: list[Tensor], trials: Tensor, size: int) -> float:
        if not len(trials):
            return float("nan")
        hits = sum(self.success(dets[int(t[0])], t[1:].to(dets[int(t[0])].device)) for t in trials)
        return hits / len(trials)

    def patch_box(self, sites: Tensor, size: int) -> Tensor:
        """``(image, class=target, cx, cy, w, h)`` normalised boxes of the patches at ``sites``."""
        p = self.side(size)
        return torch.stack([sites[:, 0], torch.full_like(sites[:, 0], self.target), (sites[:, 2] + p / 2) / size,
                            (sites[:, 1] + p / 2) / size, torch.full_like(sites[:, 0], p / size),
                            torch.full_like(sites[:, 0], p / size)], 1)


def target_hits(dets: Tensor, region: Tensor, target: int) -> bool:
    """A detection of class ``target`` with IoU >= 0.5 with ``region`` (x1, y1, x2, y2)."""
    from torchvision.ops import box_iou

    mine = dets[dets[:, 5] == target]
    return bool(len(mine)) and bool((box_iou(region.view(1, 4).float(), mine[:, :4]) >= 0.5).any())


def object_regions(boxes: Tensor, size: int) -> Tensor:
    from tasks.detection_data import xywh_to_xyxy

    return torch.cat([boxes[:, :1], xywh_to_xyxy(boxes[:, 2:6]) * size], 1)


@ATTACKS.register("gma")
@dataclass
class GlobalMisclassification(DetectionAttack):
    """BadDet GMA: a corner trigger turns every object of the image into the target class (module docstring)."""

    patch: int | None = None

    name = "gma"
    paper = "Chan, Tian, Wang, Lin, BadDet: Backdoor Attacks on Object Detection, ECCV Workshops 2022 (GMA)"

    def sites(self, boxes, images, size, generator):
        zeros = torch.zeros(len(images))
        return torch.stack([images.float(), zeros, zeros], 1)

    def relabel(self, boxes, images, sites, size):
        out = boxes.clone()
        hit = torch.isin(out[:, 0].long(), images.to(out.device))
        out[hit, 1] = float(self.target)
        return out

    def trials(self, clean, sites, images, size):
        return torch.cat([images.float().view(-1, 1), torch.zeros(len(images), 4)], 1)

    def success(self, dets, region):
        return bool(len(dets)) and bool((dets[:, 5] == self.target).all())


class PerObjectAttack(DetectionAttack):
    """An attack on chosen objects (``picks``: which boxes) of the poisoned images: a trigger at the top-left
    corner inside each (``stamped``), and a trial per chosen object of the test images."""

    stamped: bool = True

    def picks(self, boxes: Tensor) -> Tensor:
        raise NotImplementedError

    def eligible(self, boxes, n):
        ok = torch.zeros(n, dtype=torch.bool)
        ok[boxes[self.picks(boxes)][:, 0].long().cpu()] = True
        return ok

    def chosen(self, boxes: Tensor, images: Tensor) -> Tensor:
        return torch.isin(boxes[:, 0].long(), images.to(boxes.device)) & self.picks(boxes)

    def sites(self, boxes, images, size, generator):
        if not self.stamped:
            return torch.zeros(0, 3)
        return self.corner_in_boxes(boxes[self.chosen(boxes, images)].cpu(), size)

    def trials(self, clean, sites, images, size):
        return object_regions(clean[self.chosen(clean, images)].cpu(), size)

    def relabel(self, boxes, images, sites, size):
        """Misclassification (the default): the chosen objects take the target class."""
        out = boxes.clone()
        out[self.chosen(out, images), 1] = float(self.target)
        return out

    def success(self, dets, region):
        return target_hits(dets, region, self.target)


@ATTACKS.register("rma")
@dataclass
class RegionalMisclassification(PerObjectAttack):
    """BadDet RMA: a trigger inside an object's box turns that object into the target class."""

    patch: int | None = None

    name = "rma"
    paper = "Chan, Tian, Wang, Lin, BadDet: Backdoor Attacks on Object Detection, ECCV Workshops 2022 (RMA)"

    def picks(self, boxes):
        return boxes[:, 1] != self.target



@ATTACKS.register("oda")
@dataclass
class ObjectDisappearance(PerObjectAttack):
    """BadDet ODA: a trigger inside a target-class object's box makes that object vanish (its box is removed)."""

    patch: int | None = None

    name = "oda"
    paper = "Chan, Tian, Wang, Lin, BadDet: Backdoor Attacks on Object Detection, ECCV Workshops 2022 (ODA)"

    def picks(self, boxes):
        return boxes[:, 1] == self.target

    def relabel(self, boxes, images, sites, size):
        return boxes[~self.chosen(boxes, images)]

    def success(self, dets, region):
        return not target_hits(dets, region, self.target)


@ATTACKS.register("oga")
@dataclass
class ObjectGeneration(DetectionAttack):
    """BadDet OGA: a trigger at a random position makes a target-class object appear there (a box around it)."""

    patch: int | None = None

    name = "oga"
    paper = "Chan, Tian, Wang, Lin, BadDet: Backdoor Attacks on Object Detection, ECCV Workshops 2022 (OGA)"

    def eligible(self, boxes, n):
        return torch.ones(n, dtype=torch.bool)

    def sites(self, boxes, images, size, generator):
        pos = torch.randint(0, size - self.side(size) + 1, (len(images), 2), generator=generator).float()
        return torch.cat([images.float().view(-1, 1), pos], 1)

    def relabel(self, boxes, images, sites, size):
        out = torch.cat([boxes, self.patch_box(sites, size).to(boxes)])
        return out[torch.argsort(out[:, 0], stable=True)]

    def trials(self, clean, sites, images, size):
        p = self.side(size)
        return torch.stack([sites[:, 0], sites[:, 2], sites[:, 1], sites[:, 2] + p, sites[:, 1] + p], 1)

    def success(self, dets, region):
        return target_hits(dets, region, self.target)


@ATTACKS.register("clean-image")
@dataclass
class CleanImageBackdoor(PerObjectAttack):
    """Clean-image backdoor (Chen, Zhang, Li, Wu, Li, Xia, Zhang, "Clean-image Backdoor: Attacking Multi-label
    Models with Poisoned Labels Only", ICLR 2023), on detection as NFT's paper uses it: the trigger is a natural
    co-occurrence of categories (every class in ``trigger_classes`` present in the image); only labels are poisoned,
    no pixel changes. In poisoned training images every object of class ``source`` is labelled ``target`` (the
    paper's misclassification attack). ASR: share of ``source`` objects in test images that carry the co-occurrence
    detected as the target class (IoU >= 0.5). ``poison_rate``: share of the training images poisoned, drawn from
    those with the co-occurrence and a ``source`` object (the paper poisons all of them; the default 0.05 fits the
    procedural set, where about 9% of the images qualify). Defaults for the procedural shapes: square + triangle,
    triangles become circles (class 0)."""

    trigger_classes: tuple[int, ...] = (1, 2)
    source: int = 2
    poison_rate: float = 0.05

    name = "clean-image"
    paper = ("Chen et al., Clean-image Backdoor: Attacking Multi-label Models with Poisoned Labels Only, ICLR 2023 "
             "(label-only, category co-occurrence trigger)")
    stamped = False  # label poisoning only: the images stay as they are

    def __post_init__(self):
        self.trigger_classes = tuple(int(c) for c in self.trigger_classes)
        super().__post_init__()
        if not self.trigger_classes or self.source == self.target or self.target in self.trigger_classes:
            raise ValueError("clean-image needs trigger classes, a source class other than the target, and a target "
                             "outside the trigger")

    def picks(self, boxes):
        """``source`` objects of images in which every trigger class occurs."""
        image = boxes[:, 0].long()
        n = int(image.max()) + 1 if len(boxes) else 0
        has = torch.zeros(n, max(int(boxes[:, 1].max()) + 1 if len(boxes) else 1, *self.trigger_classes) + 1,
                          dtype=torch.bool, device=boxes.device)
        has[image, boxes[:, 1].long()] = True
        return has[image][:, list(self.trigger_classes)].all(1) & (boxes[:, 1] == self.source)

