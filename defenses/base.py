"""The defence interface: ``purify(model, task, clean_data, config) -> (model, info)``, registered by name.

Defences see the suspect model, the task adapter (batches, loss, MixUp, clean accuracy, perturbable
input) and the defender's clean split, nothing else: no test data, no attack, no poisoned samples.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasks.base import Registry, options_for


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
    README, GPU section)."""
    return torch.compile(model) if os.environ.get("NFTBENCH_COMPILE") == "1" else model


@dataclass
class DefenseSpec:
    """A registered defence: its function, its config dataclass (defaults from the paper) and citation."""

    name: str
    fn: Callable[..., tuple[nn.Module, dict[str, Any]]]
    config_cls: type
    paper: str

    def make_config(self, overrides: dict[str, Any] | None = None) -> Any:
        return self.config_cls(**options_for(self.config_cls, overrides or {}, f"defence {self.name!r}"))


DEFENSES: Registry[DefenseSpec] = Registry("defence")


def register_defense(name: str, config_cls: type, paper: str):
    def wrap(fn):
        DEFENSES.register(name)(DefenseSpec(name, fn, config_cls, paper))
        return fn

    return wrap


@dataclass
class NoDefenseConfig:
    pass


@register_defense("none", NoDefenseConfig, "no defence: the victim as trained")
def no_defense(model: nn.Module, task: Any, clean: Any, cfg: NoDefenseConfig, seed: int = 0):
    return model, {}


def quiet() -> bool:
    """No progress bars under CI or with NFTBENCH_QUIET=1 (as victim training and sweeps)."""
    return bool(os.environ.get("CI")) or os.environ.get("NFTBENCH_QUIET") == "1"


def purify(name: str, model: nn.Module, task: Any, clean: Any, config: dict[str, Any] | None = None,
           seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Run a registered defence; ``info`` gains the resolved config, wall time and forward-pass count. Progress:
    a bar counting the model's forward passes (every defence runs the model; their loops differ), on stderr."""
    from tqdm.auto import tqdm

    spec = DEFENSES.get(name)
    cfg = spec.make_config(config)
    forwards = [0, 0]
    bar = tqdm(desc=f"{name}", unit=" fwd", disable=quiet(), leave=False, dynamic_ncols=True, mininterval=1.0)

    def count(_module, args, _output):
        forwards[0] += 1
        forwards[1] += len(args[0]) if args and hasattr(args[0], "__len__") else 0
        bar.update()

    handle = model.register_forward_hook(count)
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    start = time.perf_counter()
    try:
        model, info = spec.fn(model, task, clean, cfg, seed=seed)
    finally:
        handle.remove()
        bar.close()
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)
    info = {
        "defense": name, "config": asdict(cfg), "wall_time_s": time.perf_counter() - start,
        "forward_passes": forwards[0], "forward_samples": forwards[1], **info,
    }
    return model, info
