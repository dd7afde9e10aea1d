"""ISSBA (ICCV 2021): invisible, sample-specific triggers from a StegaStamp encoder trained once per task.

The encoder and its decoder train on the attacker's clean images (``Issba.prepare``) and are cached under
``<cache_dir>/attacks/<hash>`` with ``attacks.image_generative.load_or_train``, as the generator attacks cache theirs;
unlike Input-aware and LIRA, the victim then trains on fixed encoded images, with no joint training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import ATTACKS
from attacks.image import ImageAttack
from attacks.image_generative import load_or_train, psnr
from common.guards import check_finite, progress
from common.hashing import config_hash


def conv_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class StegaEncoder(nn.Module):
    """StegaStamp's encoder, scaled to small images: the secret goes through a dense layer to a 3-channel map at 1/4
    resolution, is up-sampled, concatenated with the image and fed to a small U-Net whose 1x1 output is the residual.
    """

    def __init__(self, channels: int, size: tuple[int, int], bits: int, width: int):
        super().__init__()
        self.grid = (-(-size[0] // 4), -(-size[1] // 4))
        self.secret = nn.Linear(bits, 3 * self.grid[0] * self.grid[1])
        self.inc = conv_relu(channels + 3, width)
        self.down1, self.down2 = conv_relu(width, 2 * width, 2), conv_relu(2 * width, 4 * width, 2)
        self.up2, self.up1 = conv_relu(6 * width, 2 * width), conv_relu(3 * width, width)
        self.out = nn.Conv2d(width + channels + 3, channels, 1)

    def forward(self, x: Tensor, secret: Tensor) -> Tensor:
        s = F.relu(self.secret(secret * 2 - 1)).view(-1, 3, *self.grid)
        inputs = torch.cat([x - 0.5, F.interpolate(s, size=x.shape[-2:])], 1)
        e1 = self.inc(inputs)
        e2 = self.down1(e1)
        d2 = self.up2(torch.cat([F.interpolate(self.down2(e2), size=e2.shape[-2:]), e2], 1))
        d1 = self.up1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return self.out(torch.cat([d1, inputs], 1))


class StegaDecoder(nn.Sequential):
    """StegaStamp's decoder without its spatial transformer: stride-2 convs, a 4x4 pool, dense layers, bit logits."""

    def __init__(self, channels: int, bits: int, width: int):
        super().__init__(
            conv_relu(channels, width, 2), conv_relu(width, 2 * width, 2), conv_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * width, 256), nn.ReLU(inplace=True),
            nn.Linear(256, bits),
        )


@ATTACKS.register("issba")
@dataclass
class Issba(ImageAttack):
    """ISSBA (Li, Li, Wu, Li, He, Lyu, ICCV 2021): invisible, sample-specific triggers from a StegaStamp encoder that
    hides a fixed secret bit string in each image as a residual; poisoned images are the encoded ones (dirty label).

    No pre-trained encoder can be downloaded, so the suite trains one (``prepare``): encoder + decoder on the
    attacker's clean training images, a fresh random secret per image (as StegaStamp), loss ``secret_weight *
    BCE(decoded bits) + l2_weight * mean(residual^2)``, the image loss off for the first 20% of the steps, then ramped
    up linearly over the next 20% (StegaStamp: off for 1,500 steps, ramped over 15,000 of 140,000). Cached under
    ``<cache_dir>/attacks/<hash of the task config and the encoder fields>`` (safetensors + JSON with the fixed secret's
    bit accuracy and PSNR on uint8-stored encoded images), so attacks differing only in target, mode or poison rate
    share one encoder. ``apply`` = ``clip(x + encoder(x, secret), 0, 1)``: sample-specific, fixed once trained.

    Defaults: ``secret_bits`` None = 100 (ISSBA, StegaStamp) for images of 32x32 pixels or more, else one bit per 16
    pixels (16 for 16x16 digits); the secret is drawn from ``seed`` (ISSBA encodes a 7-character string + BCH code
    into 100 bits); ``secret_weight`` 1.5 (StegaStamp ``secret_loss_scale``); target 0, all-to-one, poison rate 0.1
    (ISSBA; BackdoorBench ``config/attack/ssba/default.yaml``). Scaled to a suite-trained encoder: ``encoder_steps``
    3000 batches of 32 at ``encoder_lr`` 2e-3 (StegaStamp: 140,000 batches of 4 at lr 1e-4); ``l2_weight`` 20
    (StegaStamp: 2 on a YUV L2 whose chroma terms weigh 100, plus LPIPS 1.5 and a critic 0.5; a plain L2 needs the
    larger weight to keep the residual small: ~29 dB PSNR on digits). Not reproduced: the LPIPS and critic losses
    (they need pre-trained or adversarial nets), the spatial transformer and the print/photo noise layers (the
    trigger here stays digital). Networks: 16 channels wide below 32x32 pixels, 32 from there (StegaStamp: 32-256).
    """

    secret_bits: int | None = None
    encoder_steps: int = 3000
    encoder_lr: float = 2e-3
    l2_weight: float = 20.0
    secret_weight: float = 1.5

    name = "issba"
    paper = "Li, Li, Wu, Li, He, Lyu, Invisible Backdoor Attack with Sample-Specific Triggers, ICCV 2021"

    ENCODER_BATCH: ClassVar[int] = 32

    def __post_init__(self):
        super().__post_init__()
        if self.secret_bits is not None and self.secret_bits < 1:
            raise ValueError(f"issba secret_bits must be >= 1 (or None), got {self.secret_bits}")
        if self.encoder_steps < 1 or self.encoder_lr <= 0:
            raise ValueError("issba encoder_steps must be >= 1 and encoder_lr > 0")
        if self.l2_weight < 0 or self.secret_weight <= 0:
            raise ValueError("issba l2_weight must be >= 0 and secret_weight > 0")

    def bits(self, shape: tuple[int, int, int]) -> int:
        return self.secret_bits or (100 if shape[1] * shape[2] >= 32 * 32 else shape[1] * shape[2] // 16)

    def encoder_config(self, task: Any) -> dict[str, Any]:
        keys = ("name", "seed", "secret_bits", "encoder_steps", "encoder_lr", "l2_weight", "secret_weight")
        return {"task": task.config(), "attack": {k: v for k, v in self.config().items() if k in keys}}

    def prepare(self, task: Any) -> None:
        key = (config_hash(self.encoder_config(task)), str(task.device))
        if getattr(self, "_key", None) == key:
            return
        shape = tuple(task.data.shape)
        bits, width = self.bits(shape), 16 if min(shape[1:]) < 32 else 32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.nets = nn.ModuleDict({"encoder": StegaEncoder(shape[0], shape[1:], bits, width),
                                       "decoder": StegaDecoder(shape[0], bits, width)}).to(task.device)
        secret = torch.rand(bits, generator=torch.Generator().manual_seed(self.seed)) < 0.5
        self.secret = secret.float().to(task.device)
        self.stats = load_or_train(task, key[0], self.nets, "encoder", lambda: self.train_encoder(task))
        self._key = key

    def train_encoder(self, task: Any) -> dict[str, Any]:
        """Train encoder + decoder on the attacker's clean images; return their quality (bit accuracy, PSNR)."""
        images, dev = task.data.train.x, task.device
        pool = task.attacker_idx
        g = torch.Generator().manual_seed(self.seed + 1)
        opt = torch.optim.Adam(self.nets.parameters(), lr=self.encoder_lr)
        ramp = max(1, self.encoder_steps // 5)
        bar = progress(self.encoder_steps, f"{self.name} encoder")
        for step in range(self.encoder_steps):
            idx = pool[torch.randint(len(pool), (self.ENCODER_BATCH,), generator=g)]
            x = images[idx].to(dev).float() / 255
            secret = (torch.rand(len(x), len(self.secret), generator=g) < 0.5).float().to(dev)
            residual = self.nets["encoder"](x, secret)
            decoded = self.nets["decoder"]((x + residual).clamp(0, 1))
            loss = self.secret_weight * F.binary_cross_entropy_with_logits(decoded, secret)
            loss = loss + min(1.0, max(0, step - ramp) / ramp) * self.l2_weight * residual.pow(2).mean()
            check_finite(loss, f"{self.name} encoder", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
        bar.close()
        self.nets.eval()
        with torch.no_grad():
            x = images[pool[:1024]].to(dev).float() / 255
            encoded = (self.apply(x) * 255).round() / 255
            bit_acc = ((self.nets["decoder"](encoded) > 0).float() == self.secret).float().mean()
            return {"bit_accuracy": float(bit_acc), "psnr_db": float(psnr(encoded, x).mean()),
                    "secret_bits": len(self.secret), "config": self.encoder_config(task)}

    def victim_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.stats.items() if k != "config"}

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        return (x + self.nets["encoder"](x, self.secret.expand(len(x), -1))).clamp(0, 1)
