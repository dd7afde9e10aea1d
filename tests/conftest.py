import copy
import os
from pathlib import Path

import pytest
import torch

from common.precision import PRECISION_ENV, cpu_has_bf16, set_precision

os.environ.setdefault("NFTBENCH_QUIET", "1")
# Tests mean the same on every CPU: fp32 (bf16 autocast would turn on by itself on CPUs with AMX / AVX512-BF16 and
# move victims' numbers), and a fixed thread count: 2, or fewer where fewer cores are available (2 threads pinned
# to one core by taskset spin against each other and train ~10x slower). Thresholds hold at 1 and 2 threads.
TEST_PRECISION = "fp32"
TEST_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
set_precision(TEST_PRECISION)  # before any session fixture trains a victim
torch.set_num_threads(TEST_THREADS)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session) -> None:
    """The run's precision and thread count, at the top of the output (also under -q, unlike a report header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"nftbench tests: precision {TEST_PRECISION} (bf16 only in tests about precision), torch "
                            f"threads {torch.get_num_threads()}, native cpu bf16: {cpu_has_bf16()}")


@pytest.fixture(autouse=True)
def suite_precision(monkeypatch):
    """Every test starts at the suite's precision; one that changes it (a CLI --precision) is undone after it."""
    monkeypatch.setenv(PRECISION_ENV, TEST_PRECISION)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# What the digits attack tests hold a victim to, from the measured spread: each attack's seed-0..2 victims in fp32 and
# bf16 and its seed-0 victim at 2 threads (tests/test_victim_seeds.py re-checks seeds 1-2). A change of precision or
# thread count moves a victim as far as a change of seed (CLB's seed-0 ASR: 0.81 fp32, 0.92 fp32 at 2 threads, 0.64
# bf16 at 2 threads), so a floor sits at least 0.1 under the lowest ASR measured: 0.975 for every attack not listed
# (WaNet), and beside each one listed.
ASR_FLOORS = {"sig": 0.5, "clb": 0.75, "cba": 0.8, "input-aware": 0.8}  # lowest: 0.656 (bf16 s1), 0.897, 0.926, 0.922
DEFAULT_ASR_FLOOR = 0.85
# Clean accuracy: at most 3.1 points under the benign model of the same seed and precision (CBA, WaNet), so a victim
# may lose up to 5 points (margin 1.9).
DIGITS_ACC_ALLOWANCE = 0.05


def asr_floor(attack: str) -> float:
    """The lowest ASR a digits victim of ``attack`` must reach in the tests (see ASR_FLOORS)."""
    return ASR_FLOORS.get(attack, DEFAULT_ASR_FLOOR)


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def digits_task(runs_dir):
    from tasks import create_task

    return create_task("image", dataset="digits", device="cpu", cache_dir=runs_dir)


@pytest.fixture(scope="session")
def digits_victim(digits_task, runs_dir):
    """``get(name, **params) -> (attack, model, victim.json, dir)``: the seed-0 digits victim of an attack (``none``:
    the benign model), trained once per session and shared by every test module (the model too: copy it before
    editing it)."""
    from attacks import create_attack
    from training.victims import get_victim

    cache = {}

    def get(name: str, **params):
        key = (name, repr(sorted(params.items())))
        if key not in cache:
            attack = None if name == "none" else create_attack(name, **params)
            cache[key] = (attack, *get_victim(digits_task, attack, 0, runs_dir))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def benign_acc(digits_victim) -> float:
    """Clean accuracy of the benign digits model (what a victim's clean accuracy is compared with)."""
    return digits_victim("none")[2]["metrics"]["clean_acc"]


@pytest.fixture(scope="session")
def trained_badnets_victim(digits_victim):
    return digits_victim("badnets", seed=0)


@pytest.fixture
def badnets_victim(trained_badnets_victim):
    """(attack, model, victim.json, dir) of a BadNets digits victim, trained once per session; each test gets its
    own copy of the model, so a defence that edits it in place cannot leak into another test."""
    attack, model, meta, d = trained_badnets_victim
    return attack, copy.deepcopy(model), meta, d
