"""Image classifiers, registered by name (``IMAGE_MODELS.get("preact-resnet18")``).

Every model takes pixels in [0, 1] and normalises inside (:class:`ImageClassifier`), so triggers and
universal perturbations live in pixel space. Each network names the module fine-pruning prunes
(``feature_layer``) and the BatchNorm layers NFT leaves unmasked by default (``mask_exclude``: the
stem BN, as in the NFT authors' ResNet-18).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Registry

IMAGE_MODELS: Registry[Callable[..., nn.Module]] = Registry("image model")


class ImageClassifier(nn.Module):
    """Normalisation + network. ``net`` declares ``feature_layer`` and ``mask_exclude`` by module name."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def mask_exclude(self) -> tuple[str, ...]:
        return tuple(f"net.{n}" for n in getattr(self.net, "mask_exclude", ()))

    @property
    def feature_layer(self) -> str:
        return f"net.{self.net.feature_layer}"


# ---------------------------------------------------------------------------------------------
# PreAct-ResNet-18 (He et al., ECCV 2016), the NFT paper's and BackdoorBench's CIFAR/GTSRB model.


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for 32x32 (or 64x64) inputs; width 64-512 at ``width=1``."""

    mask_exclude: tuple[str, ...] = ()  # no stem BN in a pre-activation ResNet
    feature_layer = "layer4"

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        w = [max(1, int(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(PreActBlock(cin, c, stride), PreActBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------------------------
# ResNet-18, CIFAR variant (3x3 stem, no max-pool), the NFT authors' ResNet-18.


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 with a 3x3 stem: 16 block BNs + 3 shortcut BNs are NFT's 19 masked layers."""

    mask_exclude = ("bn1",)
    feature_layer = "layer4"

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        w = [max(1, int(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------------------------
# A narrow, fast ResNet for the CPU quick scale, in the spirit of airbench (Jordan, 2024):
# conv -> [conv, pool, BN, ReLU, residual conv-BN-ReLU] x 3 -> global max pool -> linear.


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.pool(self.conv(x))))


class QuickBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = ConvBN(cin, cout, pool=True)
        self.res = ConvBN(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.res(x)


class QuickResNet(nn.Module):
    """Narrow residual CNN: ~0.29M parameters at widths (16, 32, 64, 128); 3 blocks, 7 BN layers."""

    mask_exclude = ("stem.bn",)
    feature_layer = "block3"

    def __init__(self, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        w = list(widths)
        self.stem = ConvBN(in_channels, w[0])
        self.block1 = QuickBlock(w[0], w[1])
        self.block2 = QuickBlock(w[1], w[2])
        self.block3 = QuickBlock(w[2], w[3])
        self.linear = nn.Linear(w[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.stem(x))))
        return self.linear(F.adaptive_max_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------------------------------
# airbench94 (Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv 2404.00498): the fast scale's model.


class AirbenchGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU, convs dirac-initialised on their first
    input channels, BN eps 1e-12 with PyTorch momentum 0.4 (the paper's 0.6) and weight fixed at 1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = dirac_conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = fixed_scale_bn(cout)
        self.conv2 = dirac_conv(cout, cout)
        self.bn2 = fixed_scale_bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


def dirac_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def fixed_scale_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


class AirbenchNet(nn.Module):
    """airbench94's network (Jordan 2024, Sec. 3): a frozen 2x2 whitening conv (2 x C x 4 filters: the +/- scaled
    eigenvectors of the 2x2 patch covariance, :meth:`init_from_data`) with a trained bias, GELU, three
    :class:`AirbenchGroup` of widths (64, 256, 256), global max pool, linear without bias scaled by 1/9. 1.97M
    parameters on CIFAR-10. BN weights stay at 1 in training (airbench's choice); NFT masks them all the same (the
    mask is a per-channel scale after normalisation), so its six BN layers carry 1,152 masks."""

    mask_exclude: tuple[str, ...] = ()
    feature_layer = "block3"
    early_params = ("whiten.bias",)  # trained for the recipe's ``early_param_epochs`` only (airbench: 3)

    def __init__(self, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (64, 256, 256),
                 whiten_eps: float = 5e-4):
        super().__init__()
        self.whiten_eps = whiten_eps
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.block1 = AirbenchGroup(self.whiten.out_channels, widths[0])
        self.block2 = AirbenchGroup(widths[0], widths[1])
        self.block3 = AirbenchGroup(widths[1], widths[2])
        self.linear = nn.Linear(widths[2], num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Whitening filters from normalised images ``x`` (N, C, H, W): the eigenvectors of the (uncentred)
        covariance of all 2x2 patches, each divided by sqrt(eigenvalue + eps), largest first, and their negatives."""
        c, k = x.shape[1], self.whiten.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / (eigenvalues[:, None] + self.whiten_eps).sqrt()).flip(0).view(-1, c, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(F.gelu(self.whiten(x)))))
        return self.linear(F.adaptive_max_pool2d(x, 1).flatten(1)) / 9


# ---------------------------------------------------------------------------------------------
# ResNet-50 (torchvision) for ImageNet; optionally starts from a local copy of torchvision's weights.


class TorchvisionResNet50(nn.Module):
    mask_exclude = ("model.bn1",)
    feature_layer = "model.layer4"

    def __init__(self, num_classes: int, in_channels: int = 3, pretrained: str | None = None):
        super().__init__()
        from torchvision.models import resnet50

        if in_channels != 3:
            raise ValueError("resnet50 takes RGB input (3 channels)")
        self.model = resnet50(weights=None, num_classes=1000)
        if pretrained:
            self.model.load_state_dict(load_pretrained_state(pretrained))
        if num_classes != 1000:
            self.model.fc = nn.Linear(self.model.fc.in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def load_pretrained_state(path: str) -> dict[str, Tensor]:
    """Weights from a local safetensors file; a ``.pth`` is refused (unpickling can run code) with the command that
    converts it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from common.fileio import convert_to_safetensors_hint

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained weights {p} not found; give torchvision's resnet50 weights as a .safetensors file "
            "(a .pth is refused with the command that converts it) or drop pretrained"
        )
    if p.suffix != ".safetensors":
        raise ValueError(f"pretrained {p} is not a .safetensors file; {convert_to_safetensors_hint(p)}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"pretrained {p} is not a readable safetensors file ({e}); convert or copy it again") from None


@IMAGE_MODELS.register("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, width: float = 1.0, **_) -> nn.Module:
    return PreActResNet18(num_classes, in_channels, width)


@IMAGE_MODELS.register("resnet18-cifar")
def resnet18_cifar(num_classes: int, in_channels: int = 3, width: float = 1.0, **_) -> nn.Module:
    return ResNet18Cifar(num_classes, in_channels, width)


@IMAGE_MODELS.register("resnet-quick")
def resnet_quick(num_classes: int, in_channels: int = 3, width: float = 1.0, **_) -> nn.Module:
    return QuickResNet(num_classes, in_channels, [max(1, int(c * width)) for c in (16, 32, 64, 128)])


@IMAGE_MODELS.register("resnet-tiny")
def resnet_tiny(num_classes: int, in_channels: int = 3, width: float = 1.0, **_) -> nn.Module:
    return QuickResNet(num_classes, in_channels, [max(1, int(c * width)) for c in (8, 16, 32, 64)])


@IMAGE_MODELS.register("airbench")
def airbench(num_classes: int, in_channels: int = 3, width: float = 1.0, **_) -> nn.Module:
    if width <= 0:
        raise ValueError(f"airbench width must be > 0, got {width}")
    return AirbenchNet(num_classes, in_channels, [max(1, int(c * width)) for c in (64, 256, 256)])


@IMAGE_MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, pretrained: str | None = None, **_) -> nn.Module:
    return TorchvisionResNet50(num_classes, in_channels, pretrained)
