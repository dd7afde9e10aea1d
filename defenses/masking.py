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
- ``linear_out`` / ``conv_out``: output channels of Linear / Conv layers (weight rows and bias). A conv whose
  output goes straight into a BatchNorm in train mode cannot be masked this way: BN divides each channel by its
  batch statistics, so the scale cancels and the mask gets (almost) no gradient. NFT's default of updating BN
  statistics therefore leaves ``conv_out`` masks at 1 on conv -> BN networks (measured in issue 9's study).

Transformer neurons (found by module names and attributes, so Hugging Face models need no changes):
- ``ffn``: FFN hidden units, the output channels (weight rows and bias) of each block's first FFN Linear (named
  ``fc1`` in BART / Marian / fairseq, ``linear1`` in ``nn.TransformerEncoderLayer``, ``intermediate.dense`` in
  BERT, ``wi`` in T5). Scaling a unit before a ReLU scales its output (ReLU is positively homogeneous).
- ``attn_heads``: attention heads, one mask per head on that head's rows (and bias) of the value projection
  (``v_proj``, ``v`` or ``value`` of a module with ``num_heads`` / ``n_heads`` / ``num_attention_heads``).
  Attention is linear in the values, so the mask scales the head's whole output (Michel, Levy, Neubig, "Are
  Sixteen Heads Really Better than One?", NeurIPS 2019, mask heads the same way). PyTorch's
  ``nn.MultiheadAttention`` (a packed ``in_proj_weight``) is not found.
- ``transformer``: ``attn_heads`` and ``ffn`` together, in module order (per block: self-attention,
  cross-attention, FFN), each masked module one layer of masks.
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
TRANSFORMER_TARGETS: dict[str, tuple[str, ...]] = {
    "ffn": ("ffn",), "attn_heads": ("heads",), "transformer": ("heads", "ffn"),
}
FFN_INPUT_NAMES = ("fc1", "linear1", "intermediate.dense", "wi")
VALUE_NAMES = ("v_proj", "v", "value")
HEAD_COUNT_NAMES = ("num_heads", "n_heads", "num_attention_heads")


class ChannelScale(nn.Module):
    """Parametrization ``w -> w * (mask + noise)`` along dim 0; ``mask`` may be None (then 1)."""

    def __init__(self, mask: nn.Parameter | None, channels: int, repeat: int = 1):
        super().__init__()
        self.mask = mask
        self.channels = channels
        self.repeat = repeat  # rows per mask entry (a head's head_dim value rows); 1 for one row per neuron
        self.noise: Tensor | None = None

    def scale(self) -> Tensor | None:
        if self.noise is None:
            return self.mask
        return self.noise + (1.0 if self.mask is None else self.mask)

    def forward(self, w: Tensor) -> Tensor:
        s = self.scale()
        if s is None:
            return w
        if self.repeat > 1:
            s = s.repeat_interleave(self.repeat)
        return w * s.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))


@dataclass
class MaskedLayer:
    name: str
    module: nn.Module
    mask: nn.Parameter
    scales: dict[str, ChannelScale]
    tensors: tuple[str, ...]  # what the mask scales
    repeat: int  # rows per neuron

    @torch.no_grad()
    def zero(self, channel: int) -> None:
        """Prune neuron ``channel`` for good (after :meth:`NeuronMasks.remove`): zero what its mask scales, i.e. a
        BN gamma, a Linear/Conv row and its bias, or a head's value rows and their bias."""
        rows = slice(channel * self.repeat, (channel + 1) * self.repeat)
        for t in self.tensors:
            getattr(self.module, t)[rows] = 0.0


def _value_projection(module: nn.Module) -> tuple[str, nn.Linear, int] | None:
    """(child name, value Linear, heads) of a multi-head attention module, else None."""
    heads = next((getattr(module, a) for a in HEAD_COUNT_NAMES if isinstance(getattr(module, a, None), int)), None)
    for child in VALUE_NAMES:
        v = getattr(module, child, None)
        if heads and isinstance(v, nn.Linear) and v.out_features % heads == 0:
            return child, v, heads
    return None


def neuron_modules(model: nn.Module, target: str, exclude: set[str]
                   ) -> list[tuple[str, nn.Module, int, tuple[str, ...]]]:
    """(name, module, neurons, tensors scaled) of every module ``target`` masks, in module order."""
    found = []
    if target in FAMILIES:
        types, tensors = FAMILIES[target]
        for name, module in model.named_modules():
            if isinstance(module, types) and name not in exclude and getattr(module, "weight", None) is not None:
                found.append((name, module, module.weight.shape[0], tensors))
        return found
    kinds = TRANSFORMER_TARGETS[target]
    for name, module in model.named_modules():
        value = _value_projection(module) if "heads" in kinds else None
        if value is not None and f"{name}.{value[0]}".lstrip(".") not in exclude:
            child, linear, heads = value
            found.append((f"{name}.{child}".lstrip("."), linear, heads, ("weight", "bias")))
        ffn = any(name == n or name.endswith("." + n) for n in FFN_INPUT_NAMES)
        if "ffn" in kinds and ffn and isinstance(module, nn.Linear) and name not in exclude:
            found.append((name, module, module.out_features, ("weight", "bias")))
    return found


class NeuronMasks(nn.Module):
    """Masks (init 1) on every module of a family, in module order; ``masks[l]`` has one entry per channel.

    ``exclude``: module names left unmasked (defaults to the model's ``mask_exclude``, e.g. a stem BN).
    ``bias_noise``: also parametrize the bias with ``1 + noise`` so a caller (ANP) can perturb it.
    """

    def __init__(self, model: nn.Module, target: str = "bn_gamma", exclude: Sequence[str] | None = None,
                 bias_noise: bool = False):
        super().__init__()
        if target not in FAMILIES and target not in TRANSFORMER_TARGETS:
            raise ValueError(f"unknown mask target {target!r}; valid: {', '.join([*FAMILIES, *TRANSFORMER_TARGETS])}")
        self.target = target
        exclude = set(getattr(model, "mask_exclude", ()) if exclude is None else exclude)
        self.layers: list[MaskedLayer] = []
        params = []
        for name, module, channels, tensors in neuron_modules(model, target, exclude):
            mask = nn.Parameter(torch.ones(channels, device=module.weight.device))
            repeat = module.weight.shape[0] // channels
            scales = {}
            for t in tensors:
                if getattr(module, t, None) is not None:
                    scales[t] = ChannelScale(mask, channels, repeat)
            scaled = tuple(scales)
            if bias_noise and "bias" not in scales and getattr(module, "bias", None) is not None:
                scales["bias"] = ChannelScale(None, channels, repeat)
            for t, s in scales.items():
                parametrize.register_parametrization(module, t, s)
            self.layers.append(MaskedLayer(name, module, mask, scales, scaled, repeat))
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
