"""Point-cloud classifiers, registered by name (``POINTCLOUD_MODELS.get("pointnet")``).

PointNet (Qi, Su, Mo, Guibas, "PointNet: Deep Learning on Point Sets for 3D Classification and
Segmentation", CVPR 2017; the authors' TensorFlow code ``charlesq34/pointnet``, ``models/pointnet_cls.py``
and ``models/transform_nets.py``). Input: coordinates as (N, 3, P), P points in any order and any number.

- input transform: a T-Net (shared MLP 64-128-1024, max-pool, FC 512-256) predicts a 3x3 matrix (initialised
  to the identity) that multiplies the points;
- shared MLP 64-64 (Conv1d with kernel 1 + BatchNorm1d + ReLU per layer, one weight set for every point);
- feature transform: a second T-Net predicts a 64x64 matrix that multiplies the per-point features; the
  training loss then gets ``0.001 * ||I - A A^T||_F^2`` (the paper's regulariser, added by the task's loss);
- shared MLP 64-128-1024, global max-pool over points (the symmetric function), classifier
  FC 512 -> dropout -> FC 256 -> dropout -> FC k (BN + ReLU after the hidden FCs, dropout keep 0.7).

Every layer is registered in forward order, so "module order" (NFT's layer floors) is forward order.
Each network declares:

- ``feature_layer``: the last shared-MLP layer before the global max-pool (its output, post-ReLU, is
  (N, C, P)); its C channels reach the classifier only through the max-pool and the first classifier
  ``nn.Linear(C, 512)``, the last Linear executed whose ``in_features`` is C (the T-Nets' own
  ``Linear(1024, 512)`` run earlier), which is what fine-pruning looks for;
- ``mask_exclude``: the stem BN (the first shared-MLP layer's BN), as NFT leaves a ResNet's stem BN
  unmasked. The T-Nets' BNs and the classifier's BNs are masked like any other BN (NFT masks every BN but the
  stem's), so with the input T-Net on, its five BNs come first in module order and get NFT's highest layer
  floors (0.49, 0.29, ...); ``pointnet`` has 16 masked BN layers, ``pointnet-small`` (no T-Nets) 6.
- ``feature_tnet``: the feature-transform T-Net (or None), whose output the task regularises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Registry

POINTCLOUD_MODELS: Registry[Callable[..., nn.Module]] = Registry("point cloud model")


class SharedMLPLayer(nn.Module):
    """One shared-MLP layer: Conv1d(kernel 1) + BatchNorm1d + ReLU, the same weights for every point."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 1)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class FCLayer(nn.Module):
    """Linear + BatchNorm1d + ReLU (the classifier's and T-Nets' hidden layers)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.fc(x)))


def shared_mlp(cin: int, widths: Sequence[int]) -> nn.Sequential:
    layers = []
    for w in widths:
        layers.append(SharedMLPLayer(cin, w))
        cin = w
    return nn.Sequential(*layers)


class TNet(nn.Module):
    """T-Net: predicts a k x k transform from the whole cloud; starts as the identity (zero last layer)."""

    def __init__(self, k: int, widths: Sequence[int] = (64, 128, 1024), fc: Sequence[int] = (512, 256)):
        super().__init__()
        self.k = k
        self.mlp = shared_mlp(k, widths)
        layers, cin = [], widths[-1]
        for w in fc:
            layers.append(FCLayer(cin, w))
            cin = w
        self.fc = nn.Sequential(*layers)
        self.out = nn.Linear(cin, k * k)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("identity", torch.eye(k).flatten(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        g = self.mlp(x).amax(dim=2)
        return (self.out(self.fc(g)) + self.identity).view(-1, self.k, self.k)


class PointNet(nn.Module):
    """PointNet classification network (see the module docstring); widths are parameters so a CPU-sized
    variant shares the code. ``input_transform`` / ``feature_transform`` switch the two T-Nets."""

    mask_exclude = ("mlp1.0.bn",)

    def __init__(self, num_classes: int, mlp1: Sequence[int] = (64, 64), mlp2: Sequence[int] = (64, 128, 1024),
                 head: Sequence[int] = (512, 256), input_transform: bool = True, feature_transform: bool = True,
                 tnet_widths: Sequence[int] = (64, 128, 1024), tnet_fc: Sequence[int] = (512, 256),
                 dropout: float = 0.3, in_channels: int = 3):
        super().__init__()
        if not mlp1 or not mlp2:
            raise ValueError("pointnet needs non-empty mlp1 and mlp2 widths")
        self.input_tnet = TNet(in_channels, tnet_widths, tnet_fc) if input_transform else None
        self.mlp1 = shared_mlp(in_channels, mlp1)
        self.feature_tnet = TNet(mlp1[-1], tnet_widths, tnet_fc) if feature_transform else None
        self.mlp2 = shared_mlp(mlp1[-1], mlp2)
        layers, cin = [], mlp2[-1]
        for w in head:
            layers += [FCLayer(cin, w), nn.Dropout(dropout)]
            cin = w
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_layer = f"mlp2.{len(mlp2) - 1}"  # the last shared-MLP layer before the max-pool

    def forward(self, x: Tensor) -> Tensor:
        if self.input_tnet is not None:
            x = torch.bmm(self.input_tnet(x), x)  # (N, 3, 3) @ (N, 3, P): rotate/scale the points
        x = self.mlp1(x)
        if self.feature_tnet is not None:
            x = torch.bmm(self.feature_tnet(x), x)
        x = self.mlp2(x).amax(dim=2)  # global max-pool over points
        return self.classifier(self.head(x))


def feature_transform_regularizer(a: Tensor) -> Tensor:
    """PointNet's orthogonality loss ``||I - A A^T||_F^2``, averaged over the batch."""
    a = a.float()
    eye = torch.eye(a.shape[-1], device=a.device)
    return (eye - a @ a.transpose(1, 2)).pow(2).sum(dim=(1, 2)).mean()


@POINTCLOUD_MODELS.register("pointnet")
def pointnet(num_classes: int, input_transform: bool = True, feature_transform: bool = True,
             dropout: float = 0.3, **_) -> nn.Module:
    """The paper's PointNet: T-Nets on, shared MLP 64-64 | 64-128-1024, classifier 512-256-k (3.5M parameters)."""
    return PointNet(num_classes, input_transform=input_transform, feature_transform=feature_transform,
                    dropout=dropout)


@POINTCLOUD_MODELS.register("pointnet-small")
def pointnet_small(num_classes: int, input_transform: bool = False, feature_transform: bool = False,
                   dropout: float = 0.3, width: float = 1.0, **_) -> nn.Module:
    """A CPU-sized PointNet: shared MLP 32-32 | 32-64-256, classifier 128-64-k, T-Nets off by default
    (``input_transform=true`` / ``feature_transform=true`` turn on T-Nets of widths 32-64-256 | 128-64)."""
    def w(c: int) -> int:
        return max(1, int(c * width))

    return PointNet(num_classes, mlp1=(w(32), w(32)), mlp2=(w(32), w(64), w(256)), head=(w(128), w(64)),
                    input_transform=input_transform, feature_transform=feature_transform,
                    tnet_widths=(w(32), w(64), w(256)), tnet_fc=(w(128), w(64)), dropout=dropout)
