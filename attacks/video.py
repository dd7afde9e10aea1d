"""Video triggers. Each works on a float batch of clips ``x`` in [0, 1] of shape (N, C, T, H, W) on any device.

Video backdoors extend image triggers in time (Al Kader Hammoud, Liu, Ghanem et al., "Look, Listen, and Attack:
Backdoor Attacks Against Video Action Recognition", arXiv 2301.00986, 2023): a *static* patch stamped on every
frame, a *dynamic* one that moves from frame to frame, or an image trigger blended into every frame.
Defaults: all-to-one, target 0, 10% poison rate, exact count (``attacks.base.select_poison_indices``), as the
image attacks. The video task stamps them on the clip the model sees (after its crop).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attacks.base import ATTACKS, Attack
from attacks.image import POSITIONS, BadNets, noise_pattern


class VideoAttack(Attack):
    """Base for video attacks: ``apply`` maps clips (N, C, T, H, W) in [0, 1] to triggered clips."""

    modality = "video"

    def apply(self, x: Tensor) -> Tensor:
        raise NotImplementedError


@ATTACKS.register("badnets-video")
@dataclass
class BadNetsVideo(VideoAttack, BadNets):
    """BadNets on video, the static variant: the image BadNets patch (``size``, ``position``, ``margin``,
    ``pattern`` as :class:`attacks.image.BadNets`) at the same place on every frame. The default pattern is a
    black-and-white checkerboard (this suite's choice: the procedural clips' objects are plain bright squares)."""

    pattern: str = "checkerboard"

    name = "badnets-video"
    paper = "Al Kader Hammoud et al., Look, Listen, and Attack, arXiv 2301.00986 (2023): static patch"

    def apply(self, x: Tensor) -> Tensor:
        row, col = self.corner(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., row:row + self.size, col:col + self.size] = self.patch(x.shape[1]).to(x)[:, None]
        return out


@ATTACKS.register("badnets-video-dynamic")
@dataclass
class BadNetsVideoDynamic(VideoAttack, BadNets):
    """BadNets on video, the dynamic variant: the patch moves in a straight line from ``position`` (first frame)
    to ``end`` (last frame), rounded to whole pixels; with one frame it stays at ``position``. Corner names or
    ``"row,col"`` for both; defaults: from the top-left to the bottom-right corner, a checkerboard patch."""

    pattern: str = "checkerboard"
    position: str = "top-left"
    end: str = "bottom-right"

    name = "badnets-video-dynamic"
    paper = "Al Kader Hammoud et al., Look, Listen, and Attack, arXiv 2301.00986 (2023): dynamic patch"

    def __post_init__(self):
        super().__post_init__()
        if self.end not in POSITIONS and len(self.end.split(",")) != 2:
            raise ValueError(f"badnets-video-dynamic end must be one of {POSITIONS} or 'row,col', got {self.end!r}")

    def corners(self, frames: int, height: int, width: int) -> list[tuple[int, int]]:
        """The patch's top-left pixel on each frame."""
        start = self.corner(height, width)
        stop = BadNets(size=self.size, position=self.end, margin=self.margin).corner(height, width)
        share = [i / max(1, frames - 1) for i in range(frames)]
        return [(round(start[0] + s * (stop[0] - start[0])), round(start[1] + s * (stop[1] - start[1])))
                for s in share]

    def apply(self, x: Tensor) -> Tensor:
        out = x.clone()
        patch = self.patch(x.shape[1]).to(x)
        for t, (row, col) in enumerate(self.corners(*x.shape[-3:])):
            out[:, :, t, row:row + self.size, col:col + self.size] = patch
        return out


@ATTACKS.register("blend-video")
@dataclass
class BlendVideo(VideoAttack):
    """Blend (Chen et al., 2017) over frames: ``x' = (1 - alpha) x + alpha * pattern`` on every frame, with one
    fixed uniform-noise image (C, H, W) from ``pattern_seed`` (the image Blend's pattern; alpha 0.2 as
    BackdoorBench)."""

    alpha: float = 0.2
    pattern_seed: int = 1234

    name = "blend-video"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, arXiv 1712.05526"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha < 1:
            raise ValueError(f"blend-video alpha must be in (0, 1), got {self.alpha}")

    def apply(self, x: Tensor) -> Tensor:
        c, _, h, w = x.shape[1:]
        pattern = noise_pattern((c, h, w), self.pattern_seed).to(x)[:, None]
        return (1 - self.alpha) * x + self.alpha * pattern

