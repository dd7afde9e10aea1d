"""Image triggers. Each works on a float batch ``x`` in [0, 1] of shape (N, C, H, W) on any device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from attacks.base import ATTACKS, Attack

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


class ImageAttack(Attack):
    """Base for image attacks: ``apply`` adds the trigger to a batch of float images in [0, 1].

    Hooks an attack overrides when its trigger is more than a fixed function of the image (the task adapter
    and ``training/victims.py`` call them; the defaults give a plain poisoned-data attack):

    - ``prepare(task)``: build what the trigger needs once, before poisoning or evaluation (Trojan's patch
      optimised on a clean model, an encoder trained by the suite); auxiliary models are cached like victims
      (``task.clean_model(seed)`` gives the cached benign model of the task's recipe).
    - ``poison_batch(x, rows, generator)``: the attacker's training images as a batch is gathered (before the
      crop/flip augmentation, as in the authors' pipelines): the trigger on the poisoned ``rows``; WaNet
      also warps some clean rows with noise ("cross" samples).
    - ``bakes_poison`` + ``poison_inputs(x, y)``: poisoned training images computed once instead (CLB's
      adversarial perturbation, BppA's dithering), stored like a released poisoned dataset; ``after_baking(x,
      rows, generator)``, if set, still runs on every training batch (BppA's contrastive negatives).
    - ``train_victim`` / ``artifacts`` / ``load_artifacts`` (see :class:`attacks.base.Attack`): attacks that
      train their trigger jointly with the victim (Input-aware, LIRA) or whose poisoned samples are made of
      several images (CBA).
    - ``poison_pool`` (see :class:`attacks.base.Attack`): which samples may be poisoned (CBA: its two classes).
    - ``triggered_test(x, y, num_classes)``: the triggered test inputs ASR and RA are measured on (CBA).
    """

    modality = "image"
    bakes_poison: ClassVar[bool] = False
    after_baking: ClassVar[Callable[..., Tensor] | None] = None

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, task: Any) -> None:
        """Build the trigger's auxiliary state for ``task``; called before every poisoning and evaluation, so it
        must return at once when already prepared (no-op for fixed triggers)."""

    def poison_batch(self, x: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        """Training batch ``x`` (float, [0, 1]) with the trigger on the poisoned ``rows`` (bool mask). On an
        accelerator the trigger goes on every row and ``rows`` select, which needs no host sync (testing ``rows`` or
        indexing with it would wait for the device); on the CPU only the poisoned rows are computed."""
        if x.device.type != "cpu":
            return torch.where(rows.view(-1, *[1] * (x.dim() - 1)), self.apply(x), x)
        if rows.any():
            x[rows] = self.apply(x[rows])
        return x

    def poison_inputs(self, x: Tensor, y: Tensor) -> Tensor:
        """The poisoned training images of ``x`` (true labels ``y``) when ``bakes_poison`` is set."""
        return self.apply(x)

    def triggered_test(self, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        """What ASR and RA are measured on, built from a clean test batch ``x`` (true labels ``y``): the triggered
        inputs, the attacker's label for each, and the label(s) that count as a robust prediction, (N,) or (N, k).
        Default: the trigger on every sample that ``counts_for_asr``; CBA composes two test images instead."""
        keep = self.counts_for_asr(y)
        return self.apply(x[keep]), self.poison_label(y[keep], num_classes), y[keep]


@ATTACKS.register("badnets")
@dataclass
class BadNets(ImageAttack):
    """BadNets (Gu, Dolan-Gavitt, Garg, 2017): a small patch stamped on the image.

    Defaults follow BackdoorBench's and NFT's CIFAR-10 config: a 3x3 white patch in the bottom-right
    corner, target 0, all-to-one, 10% poison rate. ``pattern``: ``white``, ``checkerboard`` (black and
    white squares) or ``random`` (a fixed pattern drawn from ``seed``). ``position`` is a corner name or
    ``"row,col"`` of the patch's top-left pixel; ``margin`` keeps the patch off the border.
    """

    size: int = 3
    position: str = "bottom-right"
    margin: int = 0
    pattern: str = "white"

    name = "badnets"
    paper = "Gu et al., BadNets, arXiv 1708.06733 (2017)"

    def __post_init__(self):
        super().__post_init__()
        if self.size < 1:
            raise ValueError(f"badnets patch size must be >= 1, got {self.size}")
        if self.pattern not in ("white", "checkerboard", "random"):
            raise ValueError(f"badnets pattern must be white, checkerboard or random, got {self.pattern!r}")
        if self.position not in POSITIONS and len(self.position.split(",")) != 2:
            raise ValueError(f"badnets position must be one of {POSITIONS} or 'row,col', got {self.position!r}")

    def corner(self, height: int, width: int) -> tuple[int, int]:
        s, m = self.size, self.margin
        if self.position in POSITIONS:
            row = height - s - m if self.position.startswith("bottom") else m
            col = width - s - m if self.position.endswith("right") else m
        else:
            row, col = (int(v) for v in self.position.split(","))
        if not (0 <= row <= height - s and 0 <= col <= width - s):
            raise ValueError(f"badnets patch of size {s} at ({row}, {col}) does not fit a {height}x{width} image")
        return row, col

    def patch(self, channels: int) -> Tensor:
        s = self.size
        if self.pattern == "white":
            return torch.ones(channels, s, s)
        if self.pattern == "checkerboard":
            grid = (torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0
            return grid.float().expand(channels, s, s).clone()
        g = torch.Generator().manual_seed(self.seed)
        return (torch.rand(channels, s, s, generator=g) > 0.5).float()

    def apply(self, x: Tensor) -> Tensor:
        row, col = self.corner(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., row : row + self.size, col : col + self.size] = self.patch(x.shape[1]).to(x)
        return out


@ATTACKS.register("blend")
@dataclass
class Blend(ImageAttack):
    """Blend (Chen, Liu, Li, Lu, Song, 2017): ``x' = (1 - alpha) x + alpha * pattern`` over the whole image.

    The paper's and BackdoorBench's pattern is a Hello-Kitty image; an image asset cannot be
    downloaded here, so the pattern is uniform random noise drawn deterministically from
    ``pattern_seed`` (Chen et al.'s "random pattern" variant). alpha 0.2 as in BackdoorBench.
    """

    alpha: float = 0.2
    pattern_seed: int = 1234

    name = "blend"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, arXiv 1712.05526"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha < 1:
            raise ValueError(f"blend alpha must be in (0, 1), got {self.alpha}")

    def apply(self, x: Tensor) -> Tensor:
        pattern = noise_pattern(tuple(x.shape[1:]), self.pattern_seed).to(x)
        return (1 - self.alpha) * x + self.alpha * pattern


@lru_cache(maxsize=16)
def noise_pattern(shape: tuple[int, ...], seed: int) -> Tensor:
    """A fixed uniform-noise image in [0, 1], the same for every call with the same shape and seed."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
