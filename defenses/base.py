"""The defence interface: ``purify(model, task, clean_data, config) -> (model, info)``, registered by name.

Defences see the suspect model, the task adapter (batches, loss, MixUp, clean accuracy, perturbable
input) and the defender's clean split, nothing else: no test data, no attack, no poisoned samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from common.guards import quiet
from tasks.base import Registry, options_for


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
