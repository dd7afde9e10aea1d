"""The Python API in one import: purify your own image classifier.

    from benchmarks.api import purify
    result = purify(model, "clean/", normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    result.model      # the purified nn.Module (same class, same state-dict keys and shapes)
    result.record     # the run record (the schema of ``runs/records``)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["Purified", "purify"]


@dataclass
class Purified:
    """A purified model and its run record (``record["before"]``/``["after"]``: C-ACC, ASR, RA where measured)."""

    model: nn.Module
    record: dict[str, Any]


def purify(model: nn.Module, clean: Any, *, defense: str = "nft", options: dict[str, Any] | None = None,
           normalize: tuple[Sequence[float], Sequence[float]] | str | None = None,
           classes: Sequence[str] | None = None, input_size: tuple[int, int] | None = None, test: Any = None,
           triggered: Any = None, target: int | None = None, seed: int = 0, device: str = "auto",
           name: str | None = None, out: str | Path | None = None, runs_dir: str | Path = "runs",
           results_csv: str | Path | None = "runs/results.csv") -> Purified:
    """Purify ``model`` (an image classifier taking (N, C, H, W) images) with ``defense`` on ``clean`` data.

    ``clean``, ``test`` and ``triggered``: an ImageFolder path (classes in numeric-aware order, or ``classes``),
    an ``(images, labels)`` pair of tensors (pixels in [0, 1] or uint8) or a Dataset of ``(image, label)``.
    ``normalize``: the (mean, std) the model was trained with, or ``"none"``; never estimated from the data.
    ``triggered`` + ``target``: ASR on your triggered images. ``model`` is not modified. With ``out``, the
    purified weights (safetensors) and the record are written there, the record also to ``runs_dir/records`` and
    a row to ``results_csv``; without it nothing is written.
    """
    from benchmarks.byo import purify_image_model, save_outputs

    net = copy.deepcopy(model)
    purified, record = purify_image_model(
        net, clean, model_label=name or f"python:{type(model).__name__}", defense=defense, options=options,
        normalize=normalize, classes=classes, input_size=input_size, test=test, triggered=triggered, target=target,
        seed=seed, device=device)
    if out is not None:
        save_outputs(purified, record, out, runs_dir, results_csv)
    return Purified(purified, record)
