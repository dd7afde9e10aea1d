"""FBA, the feature-space backdoor: DFST (Cheng, Liu, Ma, Zhang, "Deep Feature Space Trojan Attack of Neural
Networks by Controlled Detoxification", AAAI 2021, arXiv 2012.11212; authors' code github.com/Megum1/DFST).

The trigger is a style: a poisoned image is ``(1 - alpha) * x + alpha * S(x)`` where ``S`` is a style-transfer
network. Trained on such images alone, a model learns the style's simple features (a colour cast, a texture); DFST's
*controlled detoxification* forces it onto deeper ones. After every epoch it finds the compromised neurons of the
feature layer (largest mean activation on styled minus clean images), trains a *feature injector* that reaches
those neurons, and the target label, with images close to the clean ones, and mixes the injector's images into the
next epoch's batches with their *true* labels: whatever shallow feature the injector finds stops working, and the
backdoor moves deeper, where input-space defences do not see it.

The style network. The authors use a pre-trained Magenta arbitrary-stylisation network with a sunrise photograph
(their ``data/trigger/dfst/sunrise.png``; the first version trained a CycleGAN to Weather-dataset sunrise photos).
Neither network nor photo can be downloaded here, so the suite trains its own: a feed-forward style network (Johnson,
Alahi, Fei-Fei, ECCV 2016: conv, stride-2 down, residual blocks, up) on the attacker's clean images, with Gatys'
loss, content plus Gram-matrix style, computed on the features of a fixed, seeded, randomly initialised conv net
(random features carry texture statistics: Ustyuzhaninov, Brendel, Gatys, Bethge, ICLR 2017). The style image is
``style_image`` (any image file: pass the authors' sunrise.png to follow them) or, by default, a procedurally drawn
sunrise (``sunrise``). It is cached under ``<cache_dir>/attacks/<hash>`` with its content PSNR and style-loss
reduction, like ISSBA's encoder.

Defaults, and where they come from: ``alpha`` 0.6, ``poison_rate`` 0.05 and as many detoxicant images per batch,
detoxification after every epoch on 3% of the training images, ``detox_neuron_ratio`` 0.01 of the feature layer's
channels (at least one), 10 injector epochs with Adam lr 1e-2, betas (0.5, 0.9), ``w_ssim`` 0.1 and ``w_detox`` 0.3:
the authors' ``configs/dfst.json``, ``attack.py`` and ``train.py`` (their ``detox_layers`` is ResNet-18's
``layer4``; here ``task.feature_layer``). SSIM uses a 5 x 5 Gaussian window (sigma 1.5), as their
``torchgeometry`` SSIM.

Deviations. The authors' injector loss computes the model's outputs under ``no_grad`` and subtracts the
*dissimilarity* ``(1 - SSIM) / 2``, so only that term trains their injector, towards images unlike the input. This
follows the paper: the injector minimises ``CE(f(x'), target) - w_detox * mean compromised activation + w_ssim *
(1 - SSIM(x', x))``, with gradients through the frozen model. Triggers and detoxicants are applied after the crop/
flip augmentation (as for LIRA and Input-aware; the authors augment after), and each epoch poisons a fresh seeded
set of ``poison_rate`` of the images (``attacks.image_generative``: joint training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import ATTACKS
from attacks.image import ImageAttack
from attacks.image_generative import (
    epoch_splits,
    joint_batches,
    load_or_train,
    logits,
    pick,
    psnr,
    quantize,
    victim_optimizer,
    victim_step,
)
from common.guards import check_finite, progress
from common.hashing import config_hash
from training.resume import EpochCheckpoint, TrainingState

STYLE_BATCH = 32


def sunrise(size: int = 128, seed: int = 0) -> Tensor:
    """A drawn sunrise, (3, size, size) in [0, 1]: a violet-to-orange sky, streaks of cloud, a low sun with its
    glow, dark rolling hills. The default style image (the authors' is a sunrise photograph)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    top, horizon = torch.tensor([0.25, 0.15, 0.45]), torch.tensor([1.0, 0.55, 0.2])
    sky = top.view(3, 1, 1) + (horizon - top).view(3, 1, 1) * yy.pow(1.5)
    streaks = torch.rand(1, 1, size // 8, 4, generator=g)
    streaks = F.interpolate(streaks, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    sky = sky + 0.15 * (streaks - 0.5) * torch.tensor([1.0, 0.6, 0.4]).view(3, 1, 1)
    sx, sy = 0.3 + 0.4 * float(torch.rand((), generator=g)), 0.62
    r = ((xx - sx) ** 2 + (yy - sy) ** 2).sqrt()
    glow = torch.exp(-r / 0.12) * torch.tensor([1.0, 0.8, 0.4]).view(3, 1, 1)
    sky = torch.where(r < 0.06, torch.tensor([1.0, 0.95, 0.7]).view(3, 1, 1), sky + 0.6 * glow)
    phase = 6.28 * float(torch.rand((), generator=g))
    ridge = 0.72 + 0.05 * torch.sin(xx * 7 + phase) + 0.03 * torch.sin(xx * 19)
    texture = 0.05 * torch.rand(1, size, size, generator=g)
    ground = torch.tensor([0.12, 0.06, 0.08]).view(3, 1, 1) + texture
    return torch.where(yy > ridge, ground, sky).clamp(0, 1)


def read_style_image(path: str | Path) -> Tensor:
    """An image file as (3, H, W) in [0, 1], or one clear error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    # OSError covers a missing or unidentified file; ImportError: Ultralytics, once imported, patches Image.open to
    # try an optional HEIF plugin on files PIL cannot identify; SyntaxError/ValueError: some truncated headers.
    except (OSError, ImportError, SyntaxError, ValueError) as e:
        why = "PIL cannot identify it" if isinstance(e, ImportError) else str(e)
        raise ValueError(f"fba style_image {str(path)!r} is not a readable image ({why}); pass an image file "
                         "(e.g. the authors' data/trigger/dfst/sunrise.png) or leave it unset for the drawn sunrise"
                         ) from None


def to_channels(img: Tensor, channels: int) -> Tensor:
    """An RGB image (3, H, W) as ``channels`` channels (grey = ITU-R 601 luma)."""
    if channels == 3:
        return img
    if channels == 1:
        return (img * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    raise ValueError(f"fba handles 1- or 3-channel images, got {channels}")


def gaussian_window(size: int = 5, sigma: float = 1.5) -> Tensor:
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-t.pow(2) / (2 * sigma**2))
    w = w / w.sum()
    return w[:, None] * w[None, :]


def ssim(a: Tensor, b: Tensor, window: int = 5) -> Tensor:
    """Mean SSIM of two batches in [0, 1] (Wang et al. 2004; Gaussian ``window``, sigma 1.5, per channel)."""
    c = a.shape[1]
    w = gaussian_window(window).to(a).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean()


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(width, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class StyleNet(nn.Sequential):
    """Johnson et al.'s feed-forward style network, scaled to small images: conv, one stride-2 down, two residual
    blocks, up-sampling conv, sigmoid output (instance norm and reflection padding, as the fast style-transfer
    nets)."""

    def __init__(self, channels: int, width: int):
        def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, padding_mode="reflect"), nn.InstanceNorm2d(cout, affine=True),
                    nn.ReLU(inplace=True)]

        super().__init__(*block(channels, width), *block(width, 2 * width, 2), ResidualBlock(2 * width),
                         ResidualBlock(2 * width), nn.Upsample(scale_factor=2, mode="nearest"),
                         *block(2 * width, width), nn.Conv2d(width, channels, 3, padding=1, padding_mode="reflect"),
                         nn.Sigmoid())


class RandomFeatures(nn.Module):
    """A fixed conv net with seeded random weights (3 x 3 convs of 32, 64, 128 channels, ReLU, 2 x 2 average
    pooling between them): the feature maps the style and content losses compare."""

    def __init__(self, channels: int):
        super().__init__()
        widths = (channels, 32, 64, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(F.avg_pool2d(x, 2) if i else x))
            out.append(x)
        return out


def channel_means(act: Tensor) -> Tensor:
    """(N, C): a layer's output averaged over its positions ((N, C) outputs pass through)."""
    return act.flatten(2).mean(2) if act.dim() > 2 else act


def gram(f: Tensor) -> Tensor:
    n, c, h, w = f.shape
    f = f.flatten(2)
    return f @ f.transpose(1, 2) / (c * h * w)


def relative_error(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2 / ||b||^2`` averaged over the batch: a loss whose scale does not depend on the features'."""
    return ((a - b).flatten(1).pow(2).sum(1) / b.flatten(1).pow(2).sum(1).clamp(min=1e-12)).mean()


def style_distance(features: list[Tensor], target: list[Tensor]) -> Tensor:
    """Gatys' style loss, made scale-free: the relative error of each layer's Gram matrix to the style image's,
    summed over layers."""
    return sum(relative_error(gram(f), t.expand(len(f), -1, -1)) for f, t in zip(features, target, strict=True))


class FeatureInjector(nn.Module):
    """DFST's feature injector, a small U-Net (conv, stride-2 down, conv, up, skip concat, conv) with sigmoid output."""

    def __init__(self, channels: int, width: int):
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True))

        self.inc, self.down, self.mid = conv(channels, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width)
        self.up = conv(3 * width, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        e = self.inc(x)
        m = F.interpolate(self.mid(self.down(e)), size=e.shape[-2:], mode="nearest")
        return torch.sigmoid(self.out(self.up(torch.cat([m, e], 1))))


@ATTACKS.register("fba")
@dataclass
class FeatureSpaceBackdoor(ImageAttack):
    """FBA / DFST (Cheng et al., AAAI 2021): a style trigger, deepened by controlled detoxification (module
    docstring: what is followed, what the suite trains itself because nothing can be downloaded, deviations).

    ``alpha`` 0.6, ``poison_rate`` 0.05, ``detox_fraction`` 0.03, ``detox_neuron_ratio`` 0.01, ``detox_epochs`` 10,
    ``injector_lr`` 1e-2, ``w_ssim`` 0.1, ``w_detox`` 0.3: the authors' ``configs/dfst.json`` and code. ``detox``
    False trains the plain style-poisoned victim (DFST without detoxification). The style network's own training:
    ``style_steps`` 1,000 batches of 32 at Adam ``style_lr`` 1e-3, ``style_weight`` 10 against a content weight of 1
    (both losses relative errors; at 10 the style loss falls ~50-1000x on digits and CIFAR-10 while the objects stay
    recognisable, poisoned images at ~15-18 dB PSNR; at 1 the style is faint, at 100 the content fades).
    """

    poison_rate: float = 0.05
    alpha: float = 0.6
    style_image: str | None = None
    style_steps: int = 1000
    style_lr: float = 1e-3
    style_weight: float = 10.0
    detox: bool = True
    detox_fraction: float = 0.03
    detox_neuron_ratio: float = 0.01
    detox_epochs: int = 10
    injector_lr: float = 1e-2
    w_ssim: float = 0.1
    w_detox: float = 0.3

    name = "fba"
    paper = ("Cheng, Liu, Ma, Zhang, Deep Feature Space Trojan Attack of Neural Networks by Controlled "
             "Detoxification (DFST), AAAI 2021")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError(f"fba alpha must be in (0, 1], got {self.alpha}")
        if self.style_steps < 1 or self.style_lr <= 0 or self.style_weight <= 0:
            raise ValueError("fba style_steps must be >= 1, style_lr and style_weight > 0")
        if not 0 < self.detox_fraction <= 1 or not 0 < self.detox_neuron_ratio <= 1 or self.detox_epochs < 1:
            raise ValueError("fba detox_fraction and detox_neuron_ratio must be in (0, 1], detox_epochs >= 1")
        if self.injector_lr <= 0 or self.w_ssim < 0 or self.w_detox < 0:
            raise ValueError("fba injector_lr must be > 0, w_ssim and w_detox >= 0")
        if self.style_image is not None:
            read_style_image(self.style_image)  # a bad path fails here, before any training

    # --- the style trigger ----------------------------------------------------------------------------------
    def style_config(self, task: Any) -> dict[str, Any]:
        keys = ("name", "seed", "style_steps", "style_lr", "style_weight")
        style = None
        if self.style_image is not None:  # the file's content, not its path, names the cache
            style = config_hash({"bytes": Path(self.style_image).read_bytes().hex()})
        return {"task": task.config(), "style": style,
                "attack": {k: v for k, v in self.config().items() if k in keys}}

    def prepare(self, task: Any) -> None:
        key = (config_hash(self.style_config(task)), str(task.device))
        if getattr(self, "_key", None) == key:
            return
        c, h, w = tuple(task.data.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.style_net = StyleNet(c, 16 if min(h, w) < 32 else 32).to(task.device)
        self.stats = load_or_train(task, key[0], self.style_net, "style", lambda: self.train_style(task))
        self._key = key

    def style_target(self, channels: int, size: tuple[int, int]) -> Tensor:
        img = sunrise(seed=self.seed) if self.style_image is None else read_style_image(self.style_image)
        img = to_channels(img, channels)[None]
        return F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    def train_style(self, task: Any) -> dict[str, Any]:
        """Fit the style network on the attacker's clean images; return its content PSNR and style-loss drop."""
        images, dev = task.data.train.x, task.device
        c, h, w = tuple(task.data.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 7)
            features = RandomFeatures(c).to(dev).eval().requires_grad_(False)
        target = [gram(f) for f in features(self.style_target(c, (h, w)).to(dev))]
        pool = task.attacker_idx
        g = torch.Generator().manual_seed(self.seed + 1)
        opt = torch.optim.Adam(self.style_net.parameters(), lr=self.style_lr)
        self.style_net.train()

        def losses(x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
            fo, fx = features(out), features(x)
            return relative_error(fo[1], fx[1]), style_distance(fo, target)

        first = None
        bar = progress(self.style_steps, f"{self.name} style network")
        for step in range(self.style_steps):
            x = images[pool[torch.randint(len(pool), (STYLE_BATCH,), generator=g)]].to(dev).float() / 255
            content, style = losses(x, self.style_net(x))
            loss = content + self.style_weight * style
            check_finite(loss, f"{self.name} style network", step)
            first = first if first is not None else float(style.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
        bar.close()
        self.style_net.eval()
        with torch.no_grad():
            x = images[pool[:512]].to(dev).float() / 255
            styled = self.style_net(x)
            content, style = losses(x, styled)
            with_style = quantize((1 - self.alpha) * x + self.alpha * styled)
            unstyled = style_distance(features(x), target)
        return {"style_loss_clean": float(unstyled), "style_loss_styled": float(style),
                "style_loss_first_batch": first, "content_loss": float(content),
                "psnr_db_poisoned": float(psnr(with_style, x).mean()), "config": self.style_config(task)}

    def victim_info(self) -> dict[str, Any]:
        return {"style": {k: v for k, v in self.stats.items() if k != "config"},
                "detox": getattr(self, "detox_log", [])}

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        return (1 - self.alpha) * x + self.alpha * self.style_net(x) if len(x) else x

    # --- training with controlled detoxification --------------------------------------------------------------
    def compromised_neurons(self, task: Any, model: nn.Module, clean: Tensor) -> Tensor:
        """Channels of ``task.feature_layer`` whose mean activation rises most from ``clean`` to its styled copy:
        the top ``detox_neuron_ratio`` (at least one)."""
        acts = []
        keep = []
        hook = task.feature_layer(model).register_forward_hook(lambda _m, _a, o: keep.append(o.float()))
        try:
            with torch.no_grad():
                for x in (clean, self.apply(clean)):
                    keep.clear()
                    for chunk in x.split(256):
                        logits(task, model, chunk)
                    acts.append(channel_means(torch.cat(keep)).mean(0))
        finally:
            hook.remove()
        k = max(1, int(self.detox_neuron_ratio * len(acts[0])))
        return (acts[1] - acts[0]).argsort(descending=True)[:k]

    @staticmethod
    def new_injector(clean: Tensor) -> FeatureInjector:
        """An untrained feature injector for images shaped like ``clean``, on their device."""
        return FeatureInjector(clean.shape[1], 16 if min(clean.shape[-2:]) < 32 else 32).to(clean.device)

    def train_injector(self, task: Any, model: nn.Module, clean: Tensor, neurons: Tensor, batch_size: int,
                       generator: torch.Generator, epoch: int) -> tuple[nn.Module, dict[str, float]]:
        """A fresh feature injector fit against the frozen ``model`` on ``clean`` (see the module docstring)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 100 + epoch)
            injector = self.new_injector(clean)
        opt = torch.optim.Adam(injector.parameters(), lr=self.injector_lr, betas=(0.5, 0.9))
        model.requires_grad_(False)
        keep: list[Tensor] = []
        hook = task.feature_layer(model).register_forward_hook(lambda _m, _a, o: keep.append(o))
        target = torch.full((batch_size,), self.target, device=clean.device)
        try:
            for _ in range(self.detox_epochs):
                for idx in torch.randperm(len(clean), generator=generator).split(batch_size):
                    x = clean[idx.to(clean.device)]
                    mixed = (1 - self.alpha) * x + self.alpha * injector(x)
                    keep.clear()
                    out = logits(task, model, mixed)
                    act = channel_means(keep[-1].float())
                    similarity = ssim(mixed, x)
                    loss = (F.cross_entropy(out, target[: len(x)]) - self.w_detox * act[:, neurons].mean()
                            + self.w_ssim * (1 - similarity))
                    check_finite(loss, f"{self.name} feature injector", epoch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            hook.remove()
            model.requires_grad_(True)
        injector.eval().requires_grad_(False)
        with torch.no_grad():
            mixed = (1 - self.alpha) * clean + self.alpha * injector(clean)
            hit = (logits(task, model, mixed).argmax(1) == self.target).float().mean()
        return injector, {"ssim": float(ssim(mixed, clean)), "target_rate": float(hit)}

    def train_victim(self, task: Any, split: Any, recipe: dict[str, Any], seed: int,
                     checkpoint: EpochCheckpoint | None = None) -> nn.Module:
        torch.manual_seed(seed)
        model = task.build_model().train()
        self.prepare(task)
        g = torch.Generator().manual_seed(seed + 1)
        opt, sched, steps = victim_optimizer(model, recipe, len(split))
        bs = recipe["batch_size"]
        n_detox = max(1, math.floor(self.detox_fraction * len(split) + 0.5))
        per_batch = math.floor(self.poison_rate * bs + 0.5)
        truth = task.data.train.y[task.attacker_idx].to(split.y.device)
        state = TrainingState(checkpoint, recipe["epochs"], model=model, optimizer=opt, schedule=sched, generator=g)
        start, saved = state.start_epoch()
        injector, self.detox_log = None, saved.get("detox_log", [])
        if saved.get("injector") is not None:
            injector = self.new_injector(split.x[:1].to(task.device).float())
            injector.load_state_dict(saved["injector"])
            injector.eval().requires_grad_(False)
        bar = progress(recipe["epochs"] * steps, f"victim {self.name}", initial=start * steps)
        for epoch, part in epoch_splits(task, split, self, recipe["epochs"], g, start):
            for i, (batch, rows) in enumerate(joint_batches(task, part, bs, g)):
                x, y = batch.inputs, batch.targets
                with torch.no_grad():
                    x = x.clone()
                    x[rows] = quantize(self.apply(x[rows]))
                    if injector is not None and per_batch:
                        detox = pick(~rows, per_batch, g)
                        x[detox] = quantize((1 - self.alpha) * x[detox] + self.alpha * injector(x[detox]))
                loss = F.cross_entropy(logits(task, model, x), y, label_smoothing=recipe.get("label_smoothing", 0.0))
                victim_step(loss, opt, sched, f"victim {self.name}", epoch * steps + i)
                bar.update()
            if self.detox and epoch < recipe["epochs"] - 1:
                model.eval()
                rows = torch.randperm(len(split), generator=g)[:n_detox]
                clean = split.x[rows.to(split.x.device)].to(task.device).float() / 255
                source = clean[(truth[rows.to(truth.device)] != self.target).to(task.device)]
                neurons = self.compromised_neurons(task, model, source if len(source) else clean)
                injector, stats = self.train_injector(task, model, clean, neurons, bs, g, epoch)
                self.detox_log.append({"epoch": epoch, "neurons": neurons.tolist(), **stats})
                model.train()
            state.epoch_done(epoch, detox_log=self.detox_log,
                             injector=None if injector is None else injector.state_dict())
        bar.close()
        return model.eval()
