import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NFTBENCH_QUIET", "1")
# at most 2 threads, and no more than the cores this process may run on: 2 threads pinned to one core
# (taskset) spin against each other and train ~10x slower
torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def digits_task(runs_dir):
    from tasks import create_task

    return create_task("image", dataset="digits", device="cpu", cache_dir=runs_dir)


@pytest.fixture(scope="session")
def trained_badnets_victim(digits_task, runs_dir):
    from attacks import create_attack
    from benchmarks.victims import get_victim

    attack = create_attack("badnets", seed=0)
    model, meta, d = get_victim(digits_task, attack, 0, runs_dir)
    return attack, model, meta, d


@pytest.fixture
def badnets_victim(trained_badnets_victim):
    """(attack, model, victim.json, dir) of a BadNets digits victim, trained once per session; each test gets its
    own copy of the model, so a defence that edits it in place cannot leak into another test."""
    attack, model, meta, d = trained_badnets_victim
    return attack, copy.deepcopy(model), meta, d


class NoTestDataTask:
    """A task proxy that fails the test if a defence reaches for test data or the evaluator."""

    FORBIDDEN = ("test", "evaluate", "data")

    def __init__(self, task):
        object.__setattr__(self, "_task", task)

    def __getattr__(self, name):
        if name in self.FORBIDDEN:
            raise AssertionError(f"a defence accessed task.{name}: defences may only use their clean split")
        return getattr(self._task, name)


@pytest.fixture
def guarded(digits_task):
    return NoTestDataTask(digits_task)
