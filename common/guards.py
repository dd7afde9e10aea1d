"""Guards for training and defence loops: non-finite losses stop a run (without a host sync per step where it
matters), progress bars that stay silent under CI, fused optimisers and optional ``torch.compile``."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn


class NonFiniteLossError(FloatingPointError):
    """A defence's or trainer's loss became NaN/inf: the run stops and records an error instead."""


def check_finite(loss: Tensor, where: str, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"{where}: loss is {float(loss.detach().float().mean())} at step {step}; lower the learning rate "
            "or check the inputs (nothing was written for this run)"
        )


class FiniteCheck:
    """``check_finite`` for hot loops without a host sync per step: each loss's finiteness is folded into a flag on
    its device, read back every ``every`` steps (default: every step on the CPU, where reading is free; every 100 on
    an accelerator) and by :meth:`finish` after the last step. A non-finite loss raises :class:`NonFiniteLossError`
    at the next read, so the run still fails and writes nothing."""

    def __init__(self, where: str, every: int | None = None):
        self.where, self.every = where, every
        self.bad: Tensor | None = None
        self.checked = -1  # the last step read back

    def __call__(self, loss: Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.bad = bad if self.bad is None else self.bad | bad
        every = self.every or (1 if loss.device.type == "cpu" else 100)
        if (step + 1) % every == 0:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Read the flag back: raise if any loss up to ``step`` was non-finite."""
        if self.bad is not None and bool(self.bad):
            first = self.checked + 1
            where = f"at step {step}" if first == step else f"between steps {first} and {step}"
            raise NonFiniteLossError(f"{self.where}: loss became NaN/inf {where}; lower the learning rate or check "
                                     "the inputs (nothing was written for this run)")
        self.checked = step


def fused_options(model: nn.Module) -> dict[str, bool]:
    """``fused=True`` (one kernel per step for all parameters) on CUDA; on the CPU torch's default (foreach where it
    applies), so CPU numbers stay as they were."""
    return {"fused": True} if next(model.parameters()).device.type == "cuda" else {}


def maybe_compile(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` when ``NFTBENCH_COMPILE=1`` (``--compile``), else ``model``: the compiled module
    shares its parameters with ``model``. Off by default: on the CPU here it did not pay for its compile time (see
    docs/running.md, "On a GPU")."""
    return torch.compile(model) if os.environ.get("NFTBENCH_COMPILE") == "1" else model


def quiet() -> bool:
    """No progress bars under CI or with NFTBENCH_QUIET=1 (victim training, defences, sweeps)."""
    return bool(os.environ.get("CI")) or os.environ.get("NFTBENCH_QUIET") == "1"


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm bar of ``total`` steps (``initial`` of them already done), silent when :func:`quiet`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=quiet(), leave=False)
