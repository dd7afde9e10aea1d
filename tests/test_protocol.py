"""Defences talk to models only through the task protocol and only see their clean split."""

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from defenses import DEFENSES, purify, register_defense
from tasks import CleanBudget

ROOT = Path(__file__).resolve().parents[1]


def test_defences_import_no_task_module():
    for path in (ROOT / "defenses").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert not n.startswith("tasks") or n == "tasks.base", f"{path.name} imports {n}"


def test_every_defence_runs_without_test_data(digits_task, badnets_victim, guarded):
    """Each registered defence, on a guarded task whose test split and evaluator raise on access."""
    _, model, _, _ = badnets_victim
    clean = digits_task.clean_split(CleanBudget(0.05), seed=0)
    quick = {"nft": {"steps": 10}, "ft": {"steps": 10}, "fine-pruning": {"steps": 10}, "anp": {"iterations": 10},
             "ft-sam": {"steps": 10}, "rnp": {"unlearn_epochs": 2, "recover_epochs": 2}, "awm": {"epochs": 2},
             "sau": {"epochs": 2}}
    for name in DEFENSES.names():
        out, info = purify(name, copy.deepcopy(model), guarded, clean, quick.get(name, {}), seed=0)
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
