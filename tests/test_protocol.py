"""Defences talk to models only through the task protocol and only see their clean split."""

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from defenses import DEFENSES, purify, register_defense
from tasks import CleanBudget, create_task

ROOT = Path(__file__).resolve().parents[1]


def test_defences_import_only_the_protocol_module():
    """Of the suite's packages a defence imports the protocol (``tasks.base``), the floor (``common``) and other
    defences: never a concrete task, an attack, the training floor or the runner."""
    for path in (ROOT / "defenses").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                assert top not in ("tasks", "attacks", "benchmarks", "training") or n == "tasks.base", (
                    f"{path.name} imports {n}")


def reachable(obj: object, seen: set[int] | None = None) -> list[object]:
    """Every object reachable from ``obj`` through attributes, dataclass fields, containers and bound methods."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, str | int | float | bool | type(None) | torch.device | torch.dtype | type):
        return []
    seen.add(id(obj))
    out = [obj]
    if isinstance(obj, torch.Tensor):
        return out
    children: list[object] = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set | frozenset):
        children = list(obj)
    elif hasattr(obj, "__self__"):
        children = [obj.__self__]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        children += [getattr(obj, k) for k in getattr(type(obj), "__slots__", ()) if hasattr(obj, k)]
    for child in children:
        out += reachable(child, seen)
    return out


def test_every_defence_runs_on_its_view(digits_task, badnets_victim):
    """Each registered defence, through ``purify``, which hands it a :class:`DefenderView` of the task."""
    _, model, _, _ = badnets_victim
    clean = digits_task.clean_split(CleanBudget(0.05), seed=0)
    quick = {"nft": {"steps": 10}, "ft": {"steps": 10}, "fine-pruning": {"steps": 10}, "anp": {"iterations": 10},
             "ft-sam": {"steps": 10}, "rnp": {"unlearn_epochs": 2, "recover_epochs": 2}, "awm": {"epochs": 2},
             "sau": {"epochs": 2}}
    for name in DEFENSES.names():
        out, info = purify(name, copy.deepcopy(model), digits_task, clean, quick.get(name, {}), seed=0)
        assert type(out) is type(model) and out.state_dict().keys() == model.state_dict().keys(), name
        assert info["wall_time_s"] >= 0 and info["defense"] == name


@dataclass
class ShrinkConfig:
    factor: float = 0.5


def test_a_new_defence_is_one_function_and_a_registry_entry(digits_task, badnets_victim):
    """The README's example: register a defence and run it through the shared interface."""

    @register_defense("test-shrink-head", ShrinkConfig, "example from the README")
    def shrink(model, task, clean, cfg, seed=0):
        with torch.no_grad():
            task.feature_layer(model)  # the adapter, not the architecture, says where features are
            for p in model.parameters():
                p.mul_(cfg.factor if p.dim() > 1 else 1.0)
        return model, {"clean_acc": task.accuracy(model, clean)}

    try:
        _, model, _, _ = badnets_victim
        clean = digits_task.clean_split(CleanBudget(None, per_class=1), seed=0)
        _, info = purify("test-shrink-head", copy.deepcopy(model), digits_task, clean, {"factor": 1.0})
        assert info["config"] == {"factor": 1.0} and info["clean_acc"] > 0.5  # the victim's own: measured 1.0
    finally:
        DEFENSES._items.pop("test-shrink-head")


@dataclass
class SnoopConfig:
    pass


BYPASSES = {  # each way a defence could once reach past its clean split (issue 24's audit)
    "the task behind a proxy": lambda v: v._task,
    "test split": lambda v: v.test,
    "evaluator": lambda v: v.evaluate,
    "raw dataset": lambda v: v.data,
    "a bigger clean split": lambda v: v.clean_split(CleanBudget(0.05), 0),
    "the defender's reserve": lambda v: v.reserve_idx,
    "the attacker's indices": lambda v: v.attacker_idx,
    "the attacker's training set": lambda v: v.attacker_train(None, 0),
    "translation's training set": lambda v: v.train,
    "point clouds' training set": lambda v: v._train_on_device,
    "the cache dir (decoded test arrays, victim.json)": lambda v: v.cache_dir,
    "test split via a bound method": lambda v: v.accuracy.__self__.test,
    "dataset via a bound method": lambda v: v.loss.__self__.data,
    "cache dir via a bound method": lambda v: v.accuracy.__self__.cache_dir,
    "a bigger clean split via a bound method": lambda v: v.accuracy.__self__.clean_split(CleanBudget(0.05), 0),
    "the reserve via a bound method": lambda v: v.accuracy.__self__.reserve_idx,
}


@pytest.mark.parametrize(("task_name", "kwargs"), [
    ("image", {"dataset": "digits"}), ("pointcloud", {"num_points": 64}), ("translation", {}), ("detection", {}),
    ("video", {})])
def test_a_defence_sees_its_clean_split_and_nothing_else(task_name, kwargs, tmp_path):
    """A defence that tries every bypass gets an AttributeError for each; every tensor it can reach, by attribute,
    field, container or bound method, belongs to its clean split, materialised to the budget (it owns its storage);
    no path or string naming the cache dir is reachable; and the operations still work."""
    task = create_task(task_name, device="cpu", cache_dir=tmp_path / "runs", **kwargs)
    budget = CleanBudget(None, per_class=2) if task.has_classes else CleanBudget(0.02)
    clean = task.clean_split(budget, seed=0)
    seen = {}

    @register_defense("test-snoop", SnoopConfig, "a defence that keeps what it was given")
    def snoop(model, view, clean, cfg, seed=0):
        seen.update(view=view, clean=clean)
        return model, {}

    try:
        purify("test-snoop", task.build_model(), task, clean)
    finally:
        DEFENSES._items.pop("test-snoop")
    view = seen["view"]
    for what, attempt in BYPASSES.items():
        with pytest.raises(AttributeError):
            attempt(view)
            pytest.fail(f"reached {what}")
    assert seen["clean"] is view.clean and task.split_sizes(view.clean) == task.split_sizes(clean)
    objects = reachable(view)
    tensors = [t for t in objects if isinstance(t, torch.Tensor)]
    clean_tensors = {id(t) for t in reachable(view.clean) if isinstance(t, torch.Tensor)}
    assert tensors and all(id(t) in clean_tensors for t in tensors)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    assert not [o for o in objects if isinstance(o, Path)]
    strings = [v for o in objects if not isinstance(o, nn.Module) for v in getattr(o, "__dict__", {}).values()
               if isinstance(v, str)]
    assert not [v for v in strings if str(tmp_path) in v]
    model = task.build_model()
    batch = next(iter(view.iter_batches(view.clean, 4)))
    assert torch.isfinite(view.loss(model, batch)) and 0 <= view.accuracy(model, view.clean) <= 1
    assert view.with_input(batch, view.perturbable_input(batch)) is not None
