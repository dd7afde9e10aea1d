"""Action-recognition (video classification) task adapter: a small 3D CNN or torchvision's R3D-18 / R(2+1)D-18 on
procedural clips, UCF101 or HMDB51.

NFT's authors name action recognition among its applications (MixUp for video); this adapter runs NFT and every
baseline on it through the task protocol only, with no change to ``tasks/base.py`` or to any defence.

- Data (``tasks/video_data.py``): uint8 clips (N, C, T, H, W). Batches are gathered, cropped (training: a
  random crop, the same for every frame of a clip; otherwise the centre crop), the trigger is stamped on the
  poisoned clips of the cropped geometry (so a corner patch is never cropped away) and stored as uint8 like a
  released video, then flipped horizontally at random where the classes allow it (not for the procedural set,
  whose classes include left and right motion), then converted to float in [0, 1]. Procedural clips keep their
  size (the crop is a translation by up to 1/8 of the side, zero-padded, as the image task); UCF101 / HMDB51
  clips are cached at 128x128 and cropped to 112x112 (the torchvision video reference).
- Model input: (N, 3, T, H, W) floats in [0, 1]; the model normalises (the dataset's mean and std; Kinetics'
  for UCF101 / HMDB51, as the reference).
- MixUp (``mixup_loss``): clip MixUp, the pixel-wise interpolation of two whole clips (Zhang et al., ICLR 2018,
  applied to clips); ``cutmix_loss`` is VideoMix (Yun, Oh, Heo, Han, Chun, Yoo, "VideoMix: Rethinking Data
  Augmentation for Video Classification", arXiv 2012.03949, 2020): a cuboid of the partner clip pasted in, labels
  weighted by its volume. ``videomix="spatial"`` (default, S-VideoMix, the paper's best variant: a box over all
  frames) or ``"spatiotemporal"`` (a box over a random run of frames). NFT uses them with ``mix=mixup`` /
  ``mix=cutmix``.
- Perturbable input (I-BAU, SAU): the clip in [0, 1], so a universal perturbation is a (3, T, H, W) clip.
- Fine-Pruning / NAD: the last residual stage (``layer4``) of the ResNets, the last conv block of
  ``cnn3d-small``; CLP pairs every Conv3d with its BatchNorm3d (its probe is a constant clip).
- Recipes: ``quick`` (cnn3d-small, 8 frames of 16x16 procedural clips, CPU minutes): SGD one-cycle, lr 0.05, batch
  32, 12 epochs; ``paper`` (r3d_18 on UCF101 / HMDB51 split 1, 16 frames of 112x112, trained from scratch): the
  torchvision video reference's per-GPU setting, SGD lr 0.01 for batch 24, momentum 0.9, weight decay 1e-4, 45
  epochs, with a cosine schedule instead of its warm-up + multi-step one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.precision import autocast
from tasks.base import (
    TASKS,
    Batch,
    CleanBudget,
    Registry,
    Task,
    TensorBatches,
    beta_sample,
    resolve_device,
    select_clean,
    select_poison_indices,
    stratified_split,
)
from tasks.video_data import VideoDataset, VideoSet, load_video_dataset

if TYPE_CHECKING:
    from attacks.base import Attack

# ------------------------------------------------------------------------------------------------------- models
VIDEO_MODELS: Registry[Any] = Registry("video model")


class VideoClassifier(nn.Module):
    """Normalisation + network, as ``tasks.image_models.ImageClassifier`` for (N, C, T, H, W) clips."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def mask_exclude(self) -> tuple[str, ...]:
        return tuple(f"net.{n}" for n in self.net.mask_exclude)

    @property
    def feature_layer(self) -> str:
        return f"net.{self.net.feature_layer}"


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class SmallCNN3d(nn.Module):
    """A CPU-size 3D CNN: four 3x3x3 Conv3d-BatchNorm3d-ReLU blocks (the middle two stride 2 in time and space),
    global average pooling and a linear classifier; 293k parameters at the default widths and ten classes."""

    feature_layer = "layer3"
    mask_exclude = ("stem.1",)  # the stem BN, as the image models

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        self.layer1 = conv_bn(widths[0], widths[1], 2)
        self.layer2 = conv_bn(widths[1], widths[2], 2)
        self.layer3 = conv_bn(widths[2], widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


class TorchvisionVideoResNet(nn.Module):
    """torchvision's ``r3d_18`` / ``mc3_18`` / ``r2plus1d_18`` (Tran et al., CVPR 2018), randomly initialised, or
    from a local safetensors file (``pretrained=``, e.g. Kinetics-400 weights converted once; the classifier is
    replaced when the class count differs)."""

    feature_layer = "model.layer4"

    def __init__(self, arch: str, num_classes: int, pretrained: str | None = None):
        super().__init__()
        from torchvision.models import video

        state = load_safetensors(pretrained) if pretrained else None
        classes = len(state["fc.bias"]) if state is not None and "fc.bias" in state else num_classes
        self.model = getattr(video, arch)(weights=None, num_classes=classes)
        if state is not None:
            self.model.load_state_dict(state)
        if self.model.fc.out_features != num_classes:
            self.model.fc = nn.Linear(self.model.fc.in_features, num_classes)
        self.mask_exclude = tuple(f"model.stem.{n}" for n, m in self.model.stem.named_children()
                                  if isinstance(m, nn.BatchNorm3d))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def load_safetensors(path: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if p.suffix != ".safetensors" or not p.is_file():
        raise FileNotFoundError(f"pretrained weights must be a local .safetensors file; {p} is not one (convert a "
                                "torchvision checkpoint once with safetensors.torch.save_file, or drop pretrained=)")
    from safetensors.torch import load_file

    return load_file(str(p))


@VIDEO_MODELS.register("cnn3d-small")
def cnn3d_small(num_classes: int, width: float = 1.0) -> nn.Module:
    return SmallCNN3d(num_classes, [max(1, int(c * width)) for c in (16, 32, 64, 128)])


def torchvision_video(arch: str) -> Callable[..., nn.Module]:
    """The factory of one torchvision video ResNet; its signature is the options a user may set."""
    def build(num_classes: int, pretrained: str | None = None) -> nn.Module:
        return TorchvisionVideoResNet(arch, num_classes, pretrained)

    return build


for _arch in ("r3d_18", "mc3_18", "r2plus1d_18"):
    VIDEO_MODELS.register(_arch)(torchvision_video(_arch))

# ------------------------------------------------------------------------------------------------------- task
DEFAULT_MODELS = {"quick": "cnn3d-small", "paper": "r3d_18"}
GEOMETRY = {  # (frames, stored side, model-input side) per (dataset kind, scale)
    ("procedural", "quick"): (8, 16, 16), ("procedural", "paper"): (16, 32, 32),
    ("official", "quick"): (8, 64, 56), ("official", "paper"): (16, 128, 112),
}
RESERVE_FRACTION = {"procedural": 0.1}  # 100 of 1,000 clips; UCF101 split 1: 5% = 477 of 9,537
DEFAULT_RESERVE = 0.05
RECIPES: dict[str, dict[str, Any]] = {
    "quick": dict(epochs=12, batch_size=32, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                  schedule="onecycle", label_smoothing=0.0),
    "paper": dict(epochs=45, batch_size=24, lr=0.01, momentum=0.9, nesterov=False, weight_decay=1e-4,
                  schedule="cosine", label_smoothing=0.0),
}
VIDEOMIX_MODES = ("spatial", "spatiotemporal")


@TASKS.register("video")
class VideoTask(TensorBatches, Task):
    """Action-recognition adapter (see the module docstring). ``frames`` / ``size`` override the clip geometry
    (``size`` is the model's input side; official datasets are cached 8/7 larger and cropped); ``split`` is the
    official split (1-3) of UCF101 / HMDB51. As the image task, ``reserve_fraction`` of the training set
    (stratified, fixed ``split_seed``) is the defender's reserve, never seen by the attacker's training."""

    name = "video"
    default_dataset = "procedural"
    default_attack = "badnets-video"
    eval_batch_size = 256

    def __init__(
        self, dataset: str = "procedural", model: str | None = None, scale: str = "quick",
        data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "runs", device: str = "auto",
        download: bool = False, frames: int | None = None, size: int | None = None, split: int = 1,
        videomix: str = "spatial", reserve_fraction: float | None = None, split_seed: int = 0, amp: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if scale not in RECIPES:
            raise ValueError(f"the video task has scales {sorted(RECIPES)}, got {scale!r}")
        if videomix not in VIDEOMIX_MODES:
            raise ValueError(f"videomix must be one of {VIDEOMIX_MODES}, got {videomix!r}")
        if split not in (1, 2, 3):
            raise ValueError(f"UCF101 and HMDB51 have official splits 1, 2 and 3, got split={split}")
        if download:
            raise ValueError("the video datasets cannot be downloaded by nftbench; unpack UCF101 / HMDB51 under "
                             "--data-root (see tasks/video_data.py) and drop --download")
        self.dataset_name, self.scale, self.split, self.videomix = dataset, scale, split, videomix
        self.model_name = model or DEFAULT_MODELS[scale]
        VIDEO_MODELS.get(self.model_name)  # fail fast on an unknown model
        self.model_kwargs = dict(model_kwargs or {})
        kind = "procedural" if dataset == "procedural" else "official"
        t, stored, side = GEOMETRY[(kind, scale)]
        self.frames = int(frames or t)
        self.size = int(size or side)
        stored = self.size if kind == "procedural" else round(self.size * stored / side)
        self.device = resolve_device(device)
        self.amp = amp
        self.cache_dir = Path(cache_dir)
        root = data_root or os.environ.get("DATA_ROOT", "data")
        self.data: VideoDataset = load_video_dataset(dataset, root, cache_dir, self.frames, stored, split)
        self.num_classes = self.data.num_classes
        self.reserve_fraction = reserve_fraction or RESERVE_FRACTION.get(dataset, DEFAULT_RESERVE)
        self.split_seed = split_seed
        self.attacker_idx, self.reserve_idx = stratified_split(self.data.train.y, self.reserve_fraction, split_seed)
        self.flip = self.data.flip  # a horizontal flip keeps the label (not for left / right motion classes)
        self.large = self.data.train.x.numel() > 2e9  # UCF101 at 128 px: keep the clips memory-mapped on the CPU
        self.test = self.place(self.data.test)

    # --- description ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "task": self.name, "dataset": self.dataset_name, "model": self.model_name, "scale": self.scale,
            "model_kwargs": self.model_kwargs, "frames": self.frames, "size": self.size, "split": self.split,
            "videomix": self.videomix, "reserve_fraction": self.reserve_fraction, "split_seed": self.split_seed,
            "data_fingerprint": self.data.fingerprint,
        }

    def recipe(self) -> dict[str, Any]:
        return dict(RECIPES[self.scale])

    # --- model and data --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        net = VIDEO_MODELS.get(self.model_name)(num_classes=self.num_classes, **self.model_kwargs)
        return VideoClassifier(net, self.data.mean, self.data.std).to(self.device)

    def split_sizes(self, split: VideoSet) -> int:
        return len(split)

    def place(self, split: VideoSet) -> VideoSet:
        return split if self.large else split.to(self.device)

    def check_attack(self, attack: Attack | None) -> None:
        """Video attacks only (``attacks/video.py``)."""
        if attack is not None and getattr(attack, "modality", None) != "video":
            kind = getattr(attack, "modality", None) or "non-video"
            raise ValueError(f"attack {attack.name!r} is a {kind} attack; the video task takes video attacks "
                             "(badnets-video, badnets-video-dynamic, blend-video; see `nftbench list --attacks`)")

    def attacker_train(self, attack: Attack | None, seed: int) -> tuple[VideoSet, Tensor]:
        """The attacker's training clips, poisoned by ``attack`` (exact count, seeded); and the poisoned indices."""
        self.check_attack(attack)
        train = self.data.train.subset(self.attacker_idx)
        if attack is None or attack.poison_rate == 0:
            return self.place(train), torch.empty(0, dtype=torch.long)
        idx = select_poison_indices(train.y, attack, torch.Generator().manual_seed(seed))
        y = train.y.clone()
        y[idx] = attack.poison_label(y[idx], self.num_classes)
        poisoned = torch.zeros(len(y), dtype=torch.bool)
        poisoned[idx] = True
        return self.place(VideoSet(train.x, y, poisoned, attack.apply)), idx

    def clean_split(self, budget: CleanBudget, seed: int) -> VideoSet:
        """``fraction`` of the full training set, or ``per_class`` per class, from the defender's reserve."""
        chosen = select_clean(self.data.train.y, self.reserve_idx, self.num_classes, budget, seed)
        return self.place(self.data.train.subset(chosen))

    # --- batches -----------------------------------------------------------------------------------------
    def crop(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """(n, C, T, S, S) -> (n, C, T, size, size): a random crop per clip (the same for all its frames) with a
        generator, else the centre crop; procedural clips (S == size) are zero-padded by 1/8 of the side first."""
        n, side = x.shape[0], x.shape[-1]
        if generator is None:
            off = (side - self.size) // 2
            return x[..., off:off + self.size, off:off + self.size]
        if side == self.size:
            pad = max(1, side // 8)
            x, side = F.pad(x, (pad, pad, pad, pad)), side + 2 * pad
        dy = torch.randint(0, side - self.size + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, side - self.size + 1, (n,), generator=generator).to(x.device)
        ar = torch.arange(self.size, device=x.device)
        rows = (dy[:, None] + ar)[:, None, None, :, None]
        cols = (dx[:, None] + ar)[:, None, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None, None]
        times = torch.arange(x.shape[2], device=x.device)[None, None, :, None, None]
        return x[batch, chans, times, rows, cols]

    def make_batch(self, split: VideoSet, idx: Tensor, augment: bool, generator: torch.Generator | None) -> Batch:
        x = split.x[idx.to(split.x.device)].to(self.device, non_blocking=True)
        y = split.y[idx.to(split.y.device)].to(self.device, non_blocking=True)
        x = self.crop(x, generator if augment else None)
        if split.poisoned is not None:
            rows = split.poisoned[idx.to(split.poisoned.device)].to(self.device)
            if rows.any():  # quantised like a released video
                x = x.clone()
                x[rows] = (split.trigger(x[rows].float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)
        if augment and self.flip:
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
        return Batch(x.float().div_(255), y)

    # --- losses --------------------------------------------------------------------------------------------
    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        with autocast(self.device, self.amp):
            return model(x).float()

    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Tensor:
        return F.cross_entropy(self.logits(model, batch.inputs), batch.targets, label_smoothing=label_smoothing)

    def mixup_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        """Clip MixUp: one lambda ~ Beta(alpha, alpha) per batch, partner = a random permutation of the batch,
        ``x = lambda x_a + (1 - lambda) x_b`` over every frame; loss = lambda CE(y_a) + (1 - lambda) CE(y_b)."""
        lam = beta_sample(alpha, generator)
        perm = torch.randperm(len(batch), generator=generator).to(self.device)
        logits = self.logits(model, lam * batch.inputs + (1 - lam) * batch.inputs[perm])
        return lam * F.cross_entropy(logits, batch.targets) + (1 - lam) * F.cross_entropy(logits, batch.targets[perm])

    def cutmix_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        """VideoMix: lambda ~ Beta(alpha, alpha); a cuboid of volume share ~(1 - lambda) of a permutation of the
        batch is pasted in (S-VideoMix: a box of area share 1 - lambda over all frames, as CutMix; ST-VideoMix:
        sides of share (1 - lambda)^(1/3) in time, height and width), centres uniform and clipped at the borders;
        lambda is recomputed from the pasted volume; loss = lambda CE(y_a) + (1 - lambda) CE(y_b)."""
        lam = beta_sample(alpha, generator)
        perm = torch.randperm(len(batch), generator=generator).to(self.device)
        t, h, w = batch.inputs.shape[-3:]
        spatial = self.videomix == "spatial"
        cut = math.sqrt(1 - lam) if spatial else (1 - lam) ** (1 / 3)
        bounds = []
        for length, share in ((t, 1.0 if spatial else cut), (h, cut), (w, cut)):
            centre = int(torch.randint(0, length, (1,), generator=generator))
            half = int(length * share) // 2
            bounds.append((0, length) if share == 1.0 else (max(centre - half, 0), min(centre + half, length)))
        (t0, t1), (y0, y1), (x0, x1) = bounds
        x = batch.inputs.clone()
        x[..., t0:t1, y0:y1, x0:x1] = batch.inputs[perm][..., t0:t1, y0:y1, x0:x1]
        lam = 1 - (t1 - t0) * (y1 - y0) * (x1 - x0) / (t * h * w)
        logits = self.logits(model, x)
        return lam * F.cross_entropy(logits, batch.targets) + (1 - lam) * F.cross_entropy(logits, batch.targets[perm])

    def perturbable_input(self, batch: Batch) -> Tensor:
        """The clip in [0, 1] (N, 3, T, H, W): a universal perturbation is a (3, T, H, W) clip."""
        return batch.inputs

    def with_input(self, batch: Batch, inputs: Tensor) -> Batch:
        return Batch(inputs, batch.targets)

    def feature_layer(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(model.feature_layer)

    # --- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: VideoSet) -> float:
        was_training = model.training
        model.eval()
        correct = sum(int((self.logits(model, b.inputs).argmax(1) == b.targets).sum())
                      for b in self.iter_batches(split))
        model.train(was_training)
        return correct / max(1, len(split))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, attack: Attack | None) -> dict[str, float | None]:
        """C-ACC on the clean test clips (centre crop); ASR and RA on triggered test clips whose true label is not
        the target (all-to-one), every clip for all-to-all; triggered clips quantised to uint8 as in training."""
        self.check_attack(attack)
        was_training = model.training
        model.eval()
        correct = hits = robust = counted = 0
        for b in self.iter_batches(self.test):
            correct += int((self.logits(model, b.inputs).argmax(1) == b.targets).sum())
            if attack is None:
                continue
            keep = attack.counts_for_asr(b.targets)
            if not keep.any():
                continue
            x, y = (attack.apply(b.inputs[keep]) * 255).round().clamp(0, 255) / 255, b.targets[keep]
            pred = self.logits(model, x).argmax(1)
            hits += int((pred == attack.poison_label(y, self.num_classes)).sum())
            robust += int((pred == y).sum())
            counted += len(y)
        model.train(was_training)
        out: dict[str, float | None] = {"clean_acc": correct / len(self.test), "asr": None, "ra": None}
        if attack is not None:
            out["asr"], out["ra"] = hits / max(1, counted), robust / max(1, counted)
        return out
