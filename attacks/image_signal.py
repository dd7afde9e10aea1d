"""Image attacks with signal-like, image-wide triggers: SIG, WaNet, BppAttack and Low Frequency (LF).

All work batched on the images' device for any channel count and size; only BppAttack's dithering (a sequential
error diffusion) loops, over anti-diagonals of pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attacks.base import ATTACKS
from attacks.image import ImageAttack
from attacks.image_optimised import attacker_images, cached_trigger, trigger_key
from training.victims import clean_model


@ATTACKS.register("sig")
@dataclass
class SIG(ImageAttack):
    """SIG (Barni, Kallas, Tondi, ICIP 2019): clean-label; a horizontal sinusoid added to target-class images.

    ``x'[.., i, j] = clip(x + delta * sin(2 pi j f / m))`` with ``m`` the image width, the same for every row and
    channel. Defaults follow the paper and BackdoorBench (``config/attack/sig/default.yaml``,
    ``utils/bd_img_transform/sig.py``): delta 40/255, f 6, target 0. Poison rate 0.08 of the attacker's training
    set (80% of CIFAR-10's target class): BackdoorBench's 0.1 of all samples is the whole CIFAR-10 target class and
    exceeds it wherever the target class holds under 10% of the attacker's split (digits after the defender's
    reserve, GTSRB); pass ``poison_rate`` to change it.
    """

    poison_rate: float = 0.08
    delta: float = 40 / 255
    frequency: float = 6.0

    name = "sig"
    paper = ("Barni, Kallas, Tondi, A New Backdoor Attack in CNNs by Training Set Corruption Without Label "
             "Poisoning, ICIP 2019")
    clean_label = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.delta <= 1:
            raise ValueError(f"sig delta must be in (0, 1], got {self.delta}")
        if self.frequency <= 0:
            raise ValueError(f"sig frequency must be > 0, got {self.frequency}")

    def signal(self, width: int) -> Tensor:
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.frequency / width)).float()

    def apply(self, x: Tensor) -> Tensor:
        return (x + self.signal(x.shape[-1]).to(x)).clamp(0, 1)


@lru_cache(maxsize=16)
def warp_grid(height: int, width: int, k: int, s: float, rescale: float, seed: int) -> Tensor:
    """WaNet's fixed warping field as a ``grid_sample`` grid (1, H, W, 2) in [-1, 1]: a k x k grid of uniform
    random control vectors, normalised to mean magnitude 1, upsampled bicubically, scaled by s / size (x by the
    width, y by the height; the authors' square images use the height for both)."""
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    flow = F.interpolate(ctrl, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    identity = torch.stack((cols, rows), -1)[None]
    return ((identity + s * flow / torch.tensor([width, height])) * rescale).clamp(-1, 1)


@ATTACKS.register("wanet")
@dataclass
class WaNet(ImageAttack):
    """WaNet (Nguyen & Tran, ICLR 2021): images warped by a fixed, smooth random field (:func:`warp_grid`).

    Noise mode: in each training batch, ``round(cross_ratio x poisoned rows)`` clean rows ("cross" samples) are
    warped by the field plus per-pixel uniform noise of under half a pixel, keeping their labels, so the victim
    learns the exact field and not warping in general. The field is drawn from ``seed``.

    Defaults follow the authors' code and BackdoorBench (``config/attack/wanet/default.yaml``, ``attack/wanet.py``):
    k 4, s 0.5, grid_rescale 1, cross_ratio 2, poison rate 0.1, target 0. Deviations: the poisoned samples are a
    fixed, exact set (the suite's protocol) where the authors warp the first ``rate x batch`` images of each batch;
    BackdoorBench's extra rotation augmentation is not used (the task's crop + flip applies to all attacks).
    """

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    name = "wanet"
    paper = "Nguyen & Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"

    def __post_init__(self):
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"wanet k (control grid size) must be >= 2, got {self.k}")
        if self.s <= 0 or self.grid_rescale <= 0:
            raise ValueError(f"wanet s and grid_rescale must be > 0, got {self.s}, {self.grid_rescale}")
        if self.cross_ratio < 0:
            raise ValueError(f"wanet cross_ratio must be >= 0, got {self.cross_ratio}")

    def grid(self, x: Tensor) -> Tensor:
        return warp_grid(x.shape[-2], x.shape[-1], self.k, self.s, self.grid_rescale, self.seed).to(x)

    def apply(self, x: Tensor) -> Tensor:
        return F.grid_sample(x, self.grid(x).expand(len(x), -1, -1, -1), align_corners=True)

    def poison_batch(self, x: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        x = super().poison_batch(x, rows, generator)
        if generator is None:
            return x
        clean = torch.nonzero(~rows).flatten()
        n = min(len(clean), round(self.cross_ratio * int(rows.sum())))
        if n == 0:
            return x
        pick = clean[torch.randperm(len(clean), generator=generator)[:n].to(clean.device)]
        h, w = x.shape[-2:]
        noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / torch.tensor([w, h])
        grid = (self.grid(x) + noise.to(x)).clamp(-1, 1)
        x[pick] = F.grid_sample(x[pick], grid, align_corners=True)
        return x


@lru_cache(maxsize=16)
def anti_diagonals(height: int, width: int, device: str) -> list[tuple[Tensor, Tensor]]:
    """(rows, cols) of the pixels with col + 2 row == t, for t = 0, 1, ...: Floyd-Steinberg's wavefront."""
    rows = torch.arange(height)
    out = []
    for t in range(width + 2 * (height - 1)):
        r = rows[(t - 2 * rows >= 0) & (t - 2 * rows < width)]
        out.append((r.to(device), (t - 2 * r).to(device)))
    return out


def floyd_steinberg(x: Tensor, levels: int) -> Tensor:
    """Quantise ``x`` (N, C, H, W) in [0, 1] to ``levels`` levels with Floyd-Steinberg error diffusion.

    Each pixel's rounding error goes 7/16 right, 3/16 down-left, 5/16 down, 1/16 down-right (off-image shares are
    dropped). A pixel depends only on its left and upper neighbours, so all pixels with col + 2 row == t are
    quantised at once: W + 2(H - 1) steps (94 for 32x32, 670 for 224x224), each a few batched gathers and adds
    over every image and channel, instead of H x W sequential per-image steps.
    """
    q = levels - 1
    buf = F.pad(x.float(), (1, 1, 0, 1))  # one spare column each side and a spare row below take dropped error
    out = torch.empty_like(x, dtype=buf.dtype)
    for r, c in anti_diagonals(x.shape[-2], x.shape[-1], str(x.device)):
        old = buf[:, :, r, c + 1]
        new = (old * q).round().clamp(0, q) / q
        err = old - new
        out[:, :, r, c] = new
        buf[:, :, r, c + 2] += err * (7 / 16)
        buf[:, :, r + 1, c] += err * (3 / 16)
        buf[:, :, r + 1, c + 1] += err * (5 / 16)
        buf[:, :, r + 1, c + 2] += err * (1 / 16)
    return out.to(x.dtype)


@ATTACKS.register("bppa")
@dataclass
class BppAttack(ImageAttack):
    """BppAttack (Wang, Zhai, Ma, CVPR 2022): colour-depth squeezing to ``squeeze_num`` levels per channel, with
    Floyd-Steinberg dithering (:func:`floyd_steinberg`) when ``dithering`` is set.

    The poisoned training images are squeezed once per victim (``bakes_poison``) and stored as uint8, like a
    released poisoned dataset, so training does no dithering per step. Contrastive adversarial training as the
    authors' code does it: in each training batch, ``round(neg_ratio x batch)`` clean rows become negative samples,
    keeping their labels: the image plus the squeezing residual (squeezed minus original) of another training
    image, drawn from a pool of ``residual_pool`` residuals of seeded attacker images computed once
    (:meth:`prepare`; the authors' ``residual_list_train`` holds the whole training set's), so the victim learns
    the squeezing of the image itself, not squeezing-like noise. Residuals are kept as int16 multiples of 1/255:
    exact, since a training image is uint8 again after its trigger.

    Defaults: squeeze_num 8, target 0, poison rate 0.1 and neg_ratio 0.1 (BackdoorBench's
    ``config/attack/bpp/default.yaml``; the authors' code and BackdoorBench's ``original_default.yaml`` use 0.2 and
    0.2). Dithering is on, as the paper describes the attack; the authors' code and BackdoorBench default to
    ``dithering: False`` (plain rounding), which ``dithering=False`` reproduces. Dithering costs W + 2(H - 1)
    small batched steps per call (about 94 for CIFAR-sized images): once per victim for the poisoned images and the
    pool, and on the triggered test images at evaluation.
    """

    squeeze_num: int = 8
    dithering: bool = True
    neg_ratio: float = 0.1
    residual_pool: int = 5000

    name = "bppa"
    paper = ("Wang, Zhai, Ma, BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via "
             "Image Quantization and Contrastive Adversarial Learning, CVPR 2022")
    bakes_poison = True

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.squeeze_num <= 255:
            raise ValueError(f"bppa squeeze_num must be in [2, 255], got {self.squeeze_num}")
        if not 0 <= self.neg_ratio <= 1:
            raise ValueError(f"bppa neg_ratio must be in [0, 1], got {self.neg_ratio}")
        if self.residual_pool < 1:
            raise ValueError(f"bppa residual_pool must be >= 1, got {self.residual_pool}")
        self._pool_key: str | None = None
        self._residuals: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        if self.dithering:
            return floyd_steinberg(x, self.squeeze_num)
        q = self.squeeze_num - 1
        return (x * q).round() / q

    def prepare(self, task: Any) -> None:
        """The residual pool: ``squeeze(x) - x`` of ``residual_pool`` seeded attacker images, in units of 1/255."""
        key = trigger_key(task, self)
        if key == self._pool_key:
            return
        x, _ = attacker_images(task, min(self.residual_pool, len(task.attacker_idx)), self.seed)
        self._residuals = torch.cat([((self.apply(chunk) - chunk) * 255).round().to(torch.int16)
                                     for chunk in x.split(1024)])
        self._pool_key = key

    def after_baking(self, x: Tensor, rows: Tensor, generator: torch.Generator | None) -> Tensor:
        """Training batch ``x`` (float, [0, 1], poisoned ``rows`` already squeezed) with ``round(neg_ratio x
        batch)`` clean rows turned negative samples. Drawn without a host sync: the negatives are the clean rows of
        lowest random score (poisoned rows score above every clean one), a row left poisoned only if the batch
        has fewer clean rows than negatives."""
        n = min(len(x), round(self.neg_ratio * len(x)))
        if generator is None or n == 0:
            return x
        if self._residuals is None:
            raise RuntimeError("bppa's residual pool is built per task: call attack.prepare(task) first "
                               "(the task's check_attack does)")
        score = torch.rand(len(x), generator=generator).to(x.device, non_blocking=True).masked_fill(rows, 2.0)
        negative = score.topk(n, largest=False).indices
        pick = torch.randint(0, len(self._residuals), (n,), generator=generator).to(x.device, non_blocking=True)
        shifted = (x[negative] + self._residuals[pick].to(x.device, x.dtype) / 255).clamp(0, 1)
        keep = rows[negative].view(-1, *[1] * (x.dim() - 1))
        x[negative] = torch.where(keep, x[negative], shifted)
        return x


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian low-pass filter of (N, C, H, W) with zero padding; kernel of 5 sigma (the authors')."""
    size = max(1, round(5 * sigma))
    t = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad = (size // 2 - (1 - size % 2), size // 2)
    x = F.conv2d(F.pad(x, (0, 0, *pad)), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(F.pad(x, (*pad, 0, 0)), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


@ATTACKS.register("lf")
@dataclass
class LowFrequency(ImageAttack):
    """Low Frequency (Zeng, Park, Mao, Jia, ICCV 2021): a smooth universal adversarial perturbation as trigger.

    The trigger ``v`` (C, H, W) is added to the image and clipped. It is a universal perturbation towards the
    poison label (the target; y + 1 for all-to-all) of the clean model, kept low-frequency as in the authors' code:
    each of ``steps`` updates adds the Gaussian-smoothed, max-normalised gradient step (``step_size`` x
    ``magnitude``) of the targeted cross-entropy over ``num_images`` seeded attacker images, smooths ``v`` again
    and min-max normalises it to [0, ``magnitude``]; so 0 <= v <= magnitude (L-inf budget; PSNR >= 20 log10(1 /
    magnitude) = 14 dB at the default) and its spectrum is that of a Gaussian of ``sigma`` pixels at 32 px
    (scaled with the image side). Cached like Trojan's patch (safetensors + JSON, ``attacks/<hash>``).

    Defaults follow the authors' code and BackdoorBench's pattern generator (``resource/lowFrequency/
    {universal_pert,gauss_smooth}.py``; ``config/attack/lf/default.yaml``): 100 images, Gaussian sigma 6 px with a
    30 px kernel, range 0.2 (their ``normalization``), target 0, poison rate 0.1. BackdoorBench ships pre-made
    patterns that cannot be downloaded here, so the suite generates one per task. Deviation: batched gradient
    steps replace the per-image targeted DeepFool of the authors' universal-perturbation loop (which loops over
    images in Python), and the target stays the attack's target (the authors switch to the dominant fooled label).
    """

    magnitude: float = 0.2
    sigma: float = 6.0
    num_images: int = 100
    steps: int = 100
    step_size: float = 0.25

    name = "lf"
    paper = "Zeng, Park, Mao, Jia, Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective, ICCV 2021"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.magnitude <= 1:
            raise ValueError(f"lf magnitude must be in (0, 1], got {self.magnitude}")
        if self.sigma <= 0 or self.step_size <= 0:
            raise ValueError(f"lf sigma and step_size must be > 0, got {self.sigma}, {self.step_size}")
        if self.num_images < 1 or self.steps < 1:
            raise ValueError(f"lf needs num_images >= 1 and steps >= 1, got {self.num_images}, {self.steps}")
        self._key: str | None = None
        self._pattern: Tensor | None = None

    def blur(self, v: Tensor) -> Tensor:
        return gaussian_blur(v, self.sigma * min(v.shape[-2:]) / 32)

    def normalise(self, v: Tensor) -> Tensor:
        return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12) * self.magnitude

    def prepare(self, task: Any) -> None:
        key = trigger_key(task, self)
        if key != self._key:
            self._pattern, self._key = cached_trigger(task, self, lambda: self.optimise(task))["pattern"], key

    def optimise(self, task: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        model = clean_model(task, self.seed)
        x, y = attacker_images(task, self.num_images, self.seed)
        target = self.poison_label(y, task.num_classes)
        v = torch.zeros(1, *x.shape[1:], device=x.device)
        for _ in range(self.steps):
            v.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model((x + v).clamp(0, 1)), target), v)
            step = self.blur(-grad)
            step = step / step.abs().max().clamp_min(1e-12) * self.step_size * self.magnitude
            v = self.normalise(self.blur(v.detach() + step))
        with torch.no_grad():
            hits = (model((x + v).clamp(0, 1)).argmax(1) == target).float().mean()
        return {"pattern": v[0]}, {"target_rate_on_clean_model": float(hits)}

    def apply(self, x: Tensor) -> Tensor:
        if self._pattern is None:
            raise RuntimeError("lf's trigger is optimised per task: call attack.prepare(task) first "
                               "(the task's check_attack does)")
        if self._pattern.shape != x.shape[1:]:
            raise ValueError(f"lf trigger was prepared for images {tuple(self._pattern.shape)}, got "
                             f"{tuple(x.shape[1:])}")
        return (x + self._pattern.to(x)).clamp(0, 1)
