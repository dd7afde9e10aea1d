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
from torch import Tensor, nn

from common.guards import quiet
from tasks.base import DefenderView, Registry, options_for


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
    """Run a registered defence on ``clean``, the defender's split of ``task``; ``info`` gains the resolved config,
    wall time and the model's passes: forward passes and the samples they carried, and the backward passes and
    samples that reached the model's output (a SAM step counts two, a step on masks one, like a step on weights).

    The defence receives a :class:`tasks.base.DefenderView` of ``task`` (the clean split and the protocol's
    operations), never ``task`` itself. Progress: a bar counting forward passes (every defence runs the model; their
    loops differ), on stderr."""
    from tqdm.auto import tqdm

    spec = DEFENSES.get(name)
    cfg = spec.make_config(config)
    view = DefenderView(task, clean)
    passes = {"forward_passes": 0, "forward_samples": 0, "backward_passes": 0, "backward_samples": 0}
    bar = tqdm(desc=f"{name}", unit=" fwd", disable=quiet(), leave=False, dynamic_ncols=True, mininterval=1.0)

    def count(_module, args, output):
        n = len(args[0]) if args and hasattr(args[0], "__len__") else 0
        passes["forward_passes"] += 1
        passes["forward_samples"] += n
        bar.update()
        out = first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(lambda grad: count_backward(n))

    def count_backward(n: int) -> None:
        passes["backward_passes"] += 1
        passes["backward_samples"] += n

    handle = model.register_forward_hook(count)
    if view.device.type == "cuda":
        torch.cuda.synchronize(view.device)
    start = time.perf_counter()
    try:
        model, info = spec.fn(model, view, view.clean, cfg, seed=seed)
    finally:
        handle.remove()
        bar.close()
    if view.device.type == "cuda":
        torch.cuda.synchronize(view.device)
    for module in model.modules():  # a defence that returns a copy (a deep copy keeps hooks) must not count on
        for key in [k for k, hook in module._forward_hooks.items() if hook is count]:
            del module._forward_hooks[key]
    info = {"defense": name, "config": asdict(cfg), "wall_time_s": time.perf_counter() - start, **info, **passes}
    return model, info


def first_tensor(output: Any) -> Tensor | None:
    """The first tensor of a model's output (a tensor, or a tuple, list or dict of outputs: detectors, transformers'
    ModelOutput)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else ()
    return next((t for t in map(first_tensor, values) if t is not None), None)
