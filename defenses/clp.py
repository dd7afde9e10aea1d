"""CLP: Channel Lipschitzness-based Pruning (Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022, arXiv 2208.03111; authors' code rkteddy/channel-Lipschitzness-based-pruning,
``defense.py``). Data-free: no clean sample is read (``clean`` may be None) and nothing is trained.

For every convolution followed by a BatchNorm, the upper bound of each output channel's Lipschitz constant
(UCLC) is the largest singular value of that channel's kernel reshaped to ``(in_channels, k*k)``, times the
BN's per-channel scale ``|gamma| / sqrt(running_var + eps)``. Within each layer, channels whose UCLC
exceeds ``mean + u * std`` (unbiased std, as ``torch.Tensor.std`` in the authors' code) are pruned by zeroing
that BN's weight and bias, so the channel outputs exactly zero after the BN; the change is persistent in
the state dict. ``u=3`` is the authors' default (``test.py``: ``-u``, default 3).

Pairing convolutions with BatchNorms, for any model: the authors pair each ``BatchNorm2d`` with the last
``Conv2d`` *registered* before it (module order), which their README notes must be adapted for, e.g.,
PreAct-ResNets (there a block's first BN is paired with the previous block's shortcut conv, where that block
has one, instead of the conv that produced its residual branch). Here the order is
the forward pass: one forward pass in eval mode (BN statistics untouched, no gradients) of a constant probe
input (``probe_batch`` x first conv's ``in_channels`` x ``probe_size`` x ``probe_size``; no data) records
which modules run in which order, and each BN is paired with the last convolution executed before it whose
``out_channels`` equals the BN's ``num_features``. A pair is *direct* when the BN's input tensor is that
convolution's output, possibly through channel-wise modules (pooling, ReLU, Identity, Dropout), as in
ResNet-18, ResNet-50 and QuickResNet (conv -> max pool -> BN); the bound still holds through those
1-Lipschitz channel-wise maps. A BN that normalises a residual sum (PreAct-ResNet-18's block-input BNs and its final
BN) has no direct conv; with ``pair_residual=True`` (default, the authors' behaviour: every BN gets a UCLC)
it is paired with the conv that produced the sum's residual branch, the last matching conv before it, and
these pairs are listed in ``info["residual_pairs"]``; ``pair_residual=False`` skips them. A BN whose input
is an ``nn.Linear``'s output (PointNet's classifier and T-Net MLPs) is a fully connected layer's BN, not a
convolution's: it is left unpaired (listed in ``info["unpaired_bns"]``), never matched to an earlier conv that
happens to have as many channels. For Conv1d models (PointNet's shared MLPs) the probe is
``probe_batch x in_channels x probe_size`` (32 points) and each kernel is an ``(in_channels, 1)`` matrix.

Deviations, and why: ``sqrt(running_var + eps)`` instead of the authors' ``sqrt(running_var)``, because
that is the scale the BN applies (the difference is negligible); forward-order pairing instead of
module-order pairing (above); spectral norms are computed batched (``torch.linalg.matrix_norm(ord=2)``) on
the model's device instead of one SVD per channel on the CPU, with identical values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from defenses.base import register_defense

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.modules.batchnorm._BatchNorm,)
CHANNELWISE = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout,
               nn.Dropout2d)


@dataclass
class CLPConfig:
    u: float = 3.0
    pair_residual: bool = True
    probe_size: int = 32
    probe_batch: int = 2

    def __post_init__(self):
        if self.probe_size < 1 or self.probe_batch < 1:
            raise ValueError("clp needs probe_size >= 1 and probe_batch >= 1")


@dataclass
class ConvBN:
    conv_name: str
    conv: nn.Module
    bn_name: str
    bn: nn.Module
    direct: bool


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, device: torch.device, probe_size: int = 32, probe_batch: int = 2
                  ) -> tuple[list[ConvBN], list[str]]:
    """Conv -> BN pairs in forward order (see the module docstring), and the BNs left unpaired."""
    names = {m: n for n, m in model.named_modules()}
    first = next((m for m in model.modules() if isinstance(m, CONVS)), None)
    if first is None:
        return [], [n for n, m in model.named_modules() if isinstance(m, BNS)]
    executed: list[nn.Module] = []
    producer: dict[int, nn.Module] = {}  # id(tensor) -> conv whose output it is (channel-wise maps followed)
    alive: list[Tensor] = []  # keep traced tensors alive so their ids stay unique
    seen: list[tuple[nn.Module, nn.Module | None, bool]] = []

    def on_conv(m, _args, out):
        executed.append(m)
        producer[id(out)] = m
        alive.append(out)

    def on_channelwise(_m, args, out):
        if args and isinstance(args[0], Tensor) and id(args[0]) in producer:
            producer[id(out)] = producer[id(args[0])]
            alive.append(out)

    def on_linear(m, _args, out):
        producer[id(out)] = m  # a BN of a Linear's output (an MLP head, a T-Net) has no conv to pair with
        alive.append(out)

    def on_bn(m, args, _out):
        direct = producer.get(id(args[0]))
        if isinstance(direct, nn.Linear):
            seen.append((m, None, False))
            return
        conv = direct if direct is not None and direct.out_channels == m.num_features else None
        if conv is None:
            conv = next((c for c in reversed(executed) if c.out_channels == m.num_features), None)
        seen.append((m, conv, conv is not None and conv is direct))

    handles = []
    for m in model.modules():
        if isinstance(m, CONVS):
            handles.append(m.register_forward_hook(on_conv))
        elif isinstance(m, BNS):
            handles.append(m.register_forward_hook(on_bn))
        elif isinstance(m, CHANNELWISE):
            handles.append(m.register_forward_hook(on_channelwise))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(on_linear))
    spatial = (probe_size,) * (first.weight.dim() - 2)
    probe = torch.full((probe_batch, first.in_channels, *spatial), 0.5, device=device, dtype=first.weight.dtype)
    was_training = model.training
    model.eval()
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    pairs, unpaired, done = [], [], set()
    for bn, conv, direct in seen:
        if bn in done:  # a BN run twice keeps its first pairing
            continue
        done.add(bn)
        if conv is None:
            unpaired.append(names[bn])
        else:
            pairs.append(ConvBN(names[conv], conv, names[bn], bn, direct))
    unpaired += [n for n, m in model.named_modules() if isinstance(m, BNS) and m not in done]
    return pairs, unpaired


@torch.no_grad()
def channel_lipschitz(conv: nn.Module, bn: nn.Module) -> Tensor:
    """UCLC per output channel: ||W_k reshaped to (in, k*k)||_2 * |gamma_k| / sqrt(running_var_k + eps)."""
    w = conv.weight.detach().float()
    spectral = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    scale = torch.ones_like(spectral)
    if bn.weight is not None:
        scale = bn.weight.detach().float().abs()
    if bn.running_var is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    return spectral * scale


def clp_selection(uclc: Tensor, u: float) -> Tensor:
    """Indices of channels with UCLC > mean + u * std (unbiased std) within one layer."""
    if uclc.numel() < 2:
        return torch.empty(0, dtype=torch.long, device=uclc.device)
    return torch.nonzero(uclc > uclc.mean() + u * uclc.std()).flatten()


@register_defense("clp", CLPConfig, "Zheng, Tang, Li, Liu, Data-free Backdoor Removal based on Channel "
                                   "Lipschitzness, ECCV 2022")
def clp(model: nn.Module, task: Any, clean: Any, cfg: CLPConfig, seed: int = 0) -> tuple[nn.Module, dict]:
    device = next((p.device for p in model.parameters()), task.device)
    pairs, unpaired = conv_bn_pairs(model, device, cfg.probe_size, cfg.probe_batch)
    if not pairs:
        raise ValueError("clp found no convolution followed by a BatchNorm in this model; CLP needs conv + BN")
    per_layer: dict[str, int] = {}
    pruned_idx: dict[str, list[int]] = {}
    total = pruned = 0
    residual = []
    with torch.no_grad():
        for pair in pairs:
            if not pair.direct:
                if not cfg.pair_residual:
                    unpaired.append(pair.bn_name)
                    continue
                residual.append(f"{pair.conv_name} -> {pair.bn_name}")
            uclc = channel_lipschitz(pair.conv, pair.bn)
            idx = clp_selection(uclc, cfg.u)
            if idx.numel():
                if pair.bn.weight is not None:
                    pair.bn.weight[idx] = 0
                if pair.bn.bias is not None:
                    pair.bn.bias[idx] = 0
                pruned_idx[pair.bn_name] = idx.cpu().tolist()
            per_layer[pair.bn_name] = int(idx.numel())
            total += uclc.numel()
            pruned += int(idx.numel())
    model.eval()
    info = {
        "steps": 0, "clean_samples": 0, "u": cfg.u,
        "layers": len(per_layer), "channels_pruned": pruned, "total_channels": total,
        "prune_ratio": pruned / max(1, total), "pruned_per_layer": per_layer, "pruned_channels": pruned_idx,
        "residual_pairs": residual, "unpaired_bns": unpaired,
    }
    return model, info
