"""One multiplicative mask per neuron (channel) on any module family, without editing model code.

Masks are attached with ``torch.nn.utils.parametrize``: the module's ``weight`` (and, for some
targets, ``bias``) is recomputed as ``weight * scale`` on each forward, where ``scale`` is the mask
(plus an optional perturbation, which ANP uses). A mask of 1 multiplies by exactly 1.0, so outputs are
bit-identical to the unmasked model. :meth:`NeuronMasks.remove` either restores the original weights
or folds the masks into them, leaving a plain model of the same architecture.

Targets (``target``):
- ``bn_gamma``: BatchNorm weight only, ``BN(x) = gamma * m * x_hat + beta`` (NFT's choice).
- ``bn_affine``: BatchNorm weight and bias, i.e. the whole BN output channel is scaled.
- ``layernorm``: LayerNorm gain (the BN analogue in Transformers).
- ``linear_out`` / ``conv_out``: output channels of Linear / Conv layers (weight rows and bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

FAMILIES: dict[str, tuple[tuple[type[nn.Module], ...], tuple[str, ...]]] = {
    "bn_gamma": ((nn.modules.batchnorm._BatchNorm,), ("weight",)),
    "bn_affine": ((nn.modules.batchnorm._BatchNorm,), ("weight", "bias")),
    "layernorm": ((nn.LayerNorm,), ("weight",)),
    "linear_out": ((nn.Linear,), ("weight", "bias")),
    "conv_out": ((nn.Conv1d, nn.Conv2d, nn.Conv3d), ("weight", "bias")),
}


class ChannelScale(nn.Module):
    """Parametrization ``w -> w * (mask + noise)`` along dim 0; ``mask`` may be None (then 1)."""

    def __init__(self, mask: nn.Parameter | None, channels: int):
        super().__init__()
        self.mask = mask
        self.channels = channels
        self.noise: Tensor | None = None

    def scale(self) -> Tensor | None:
        if self.noise is None:
            return self.mask
        return self.noise + (1.0 if self.mask is None else self.mask)

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale()
        if s is None:
            return w
        return w * s.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


@dataclass
class MaskedLayer:
    name: str
    module: nn.Module
    mask: nn.Parameter
    scales: dict[str, ChannelScale]


class NeuronMasks(nn.Module):
    """Masks (init 1) on every module of a family, in module order; ``masks[l]`` has one entry per channel.

    ``exclude``: module names left unmasked (defaults to the model's ``mask_exclude``, e.g. a stem BN).
    ``bias_noise``: also parametrize the bias with ``1 + noise`` so a caller (ANP) can perturb it.
    """

    def __init__(self, model: nn.Module, target: str = "bn_gamma", exclude: Sequence[str] | None = None,
                 bias_noise: bool = False):
        super().__init__()
        if target not in FAMILIES:
            raise ValueError(f"unknown mask target {target!r}; valid: {', '.join(FAMILIES)}")
        types, tensors = FAMILIES[target]
        self.target = target
        exclude = set(getattr(model, "mask_exclude", ()) if exclude is None else exclude)
        self.layers: list[MaskedLayer] = []
        params = []
        for name, module in model.named_modules():
            if not isinstance(module, types) or name in exclude or getattr(module, "weight", None) is None:
                continue
            channels = module.weight.shape[0]
            mask = nn.Parameter(torch.ones(channels, device=module.weight.device))
            scales = {}
            for t in tensors:
                if getattr(module, t, None) is not None:
                    scales[t] = ChannelScale(mask, channels)
            if bias_noise and "bias" not in scales and getattr(module, "bias", None) is not None:
                scales["bias"] = ChannelScale(None, channels)
            for t, s in scales.items():
                parametrize.register_parametrization(module, t, s)
            self.layers.append(MaskedLayer(name, module, mask, scales))
            params.append(mask)
        if not self.layers:
            raise ValueError(f"model has no {target} modules to mask (excluded: {sorted(exclude)})")
        self.masks = nn.ParameterList(params)

    def __len__(self) -> int:
        return len(self.layers)

    def num_neurons(self) -> int:
        return sum(m.numel() for m in self.masks)

    @torch.no_grad()
    def clamp_(self, lower: Sequence[float] | float = 0.0, upper: float = 1.0) -> None:
        lows = [lower] * len(self.masks) if isinstance(lower, float | int) else list(lower)
        for m, lo in zip(self.masks, lows, strict=True):
            m.clamp_(lo, upper)

    def set_noise(self, weight: Sequence[Tensor] | None, bias: Sequence[Tensor] | None = None) -> None:
        """Perturb masks (``weight``) and biases (``bias``), one tensor per layer; None clears."""
        for i, layer in enumerate(self.layers):
            for t, s in layer.scales.items():
                noise = weight if t == "weight" or s.mask is not None else bias
                s.noise = None if noise is None else noise[i]

    def statistics(self) -> dict[str, float]:
        flat = torch.cat([m.detach().flatten().float().cpu() for m in self.masks])
        return {
            "mask_layers": len(self.masks), "mask_neurons": flat.numel(), "mask_mean": float(flat.mean()),
            "mask_min": float(flat.min()), "mask_below_0.5": int((flat < 0.5).sum()),
            "mask_at_1": int((flat >= 1 - 1e-6).sum()),
        }

    @torch.no_grad()
    def remove(self, fold: bool = True) -> None:
        """Detach every parametrization; ``fold`` keeps the masked weights, else restores the originals."""
        self.set_noise(None, None)
        for layer in self.layers:
            for t in list(layer.scales):
                parametrize.remove_parametrizations(layer.module, t, leave_parametrized=fold)
        self.layers = []
