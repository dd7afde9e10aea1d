"""The GPU path (issue 21): deferred NaN checks, step-capped victims, and CPU determinism after the sync removal."""

import copy

import pytest
import torch

from attacks import create_attack
from common.guards import FiniteCheck, NonFiniteLossError
from defenses import purify
from tasks import CleanBudget
from training.loop import train_model
from training.victims import get_victim, victim_config


def test_finite_check_reads_back_every_n_steps_and_at_the_end():
    check = FiniteCheck("t", every=5)
    for step in range(3):
        check(torch.tensor(1.0), step)
    check(torch.tensor(float("nan")), 3)  # noted on the device, not read yet
    with pytest.raises(NonFiniteLossError, match=r"t: loss became NaN/inf between steps 0 and 4"):
        check(torch.tensor(1.0), 4)
    tail = FiniteCheck("tail", every=100)
    tail(torch.tensor(1.0), 0)
    tail(torch.tensor(float("inf")), 1)
    with pytest.raises(NonFiniteLossError, match="between steps 0 and 1"):
        tail.finish(1)
    cpu = FiniteCheck("cpu")  # on the CPU: every step, so the step is exact
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        cpu(torch.tensor(float("nan")), 0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_victim_training_nft_and_anp_are_deterministic_on_the_cpu(digits_task):
    split, _ = digits_task.attacker_train(create_attack("badnets", seed=0), 0)
    sub = split.subset(torch.arange(256))
    recipe = {**digits_task.recipe(), "epochs": 2}
    a, b = (train_model(digits_task, sub, recipe, seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(_state(a).values(), _state(b).values(), strict=True))
    clean = digits_task.clean_split(CleanBudget(fraction=None, per_class=3), 0)
    for name, options in (("nft", {"steps": 4}), ("anp", {"iterations": 3})):
        (m1, i1), (m2, i2) = (purify(name, copy.deepcopy(a), digits_task, clean, options, seed=1) for _ in range(2))
        assert i1["loss_trace"] == i2["loss_trace"] and all(isinstance(v, float) for v in
                                                             torch.tensor(i1["loss_trace"]).flatten().tolist())
        assert all(torch.equal(x, y) for x, y in zip(_state(m1).values(), _state(m2).values(), strict=True))


def test_max_steps_caps_the_victim_under_an_id_of_its_own(digits_task, tmp_path):
    attack = create_attack("badnets", seed=0)
    _, meta, d = get_victim(digits_task, attack, 0, tmp_path, max_steps=2)
    assert meta["config"]["max_steps"] == 2 and meta["config"] == {**victim_config(digits_task, attack, 0),
                                                                    "max_steps": 2}
    assert meta["train_images_per_s"] > 0 and d.name == meta["victim_id"]
    with pytest.raises(ValueError, match="--max-steps must be >= 1"):
        get_victim(digits_task, attack, 0, tmp_path, max_steps=0)
    with pytest.raises(ValueError, match="trains its victim itself"):
        get_victim(digits_task, create_attack("cba", seed=0), 0, tmp_path, max_steps=2)


def test_dry_run_counts_clean_models_surrogates_and_trigger_networks():
    from benchmarks.plan import COST_TABLE, Cell, Plan, estimate
    from benchmarks.run import RunConfig

    def cells(dataset, attacks, seeds=(0,), task="image"):
        return [Cell(RunConfig(task=task, dataset=dataset, scale="paper", attack=a, seed=s), f"{a}{s}", {})
                for a in attacks for s in seeds]

    plan = Plan("t", "", cells("cifar10", ["trojan", "clb", "lf", "issba", "badnets"], seeds=(0, 1)))
    est = estimate(plan, "gpu", 1)
    # one clean model per seed, shared by Trojan, CLB and LF; ISSBA's encoder per seed
    assert (est["clean_models_to_train"], est["trigger_networks_to_train"], est["surrogates_to_train"]) == (2, 2, 0)
    victim_s = COST_TABLE[("cifar10", "paper")]["gpu"][0]
    without = estimate(Plan("t", "", [c for c in plan.cells if c.cfg.attack == "badnets"]), "gpu", 1)
    assert est["estimated_s"] > without["estimated_s"] + 2 * victim_s  # the clean models are costed
    with_benign = Plan("t", "", plan.cells + cells("cifar10", [None], seeds=(0, 1)))
    assert estimate(with_benign, "gpu", 1)["clean_models_to_train"] == 0  # the benign victims are those models
    pcba = estimate(Plan("t", "", cells("modelnet40", ["pcba"], task="pointcloud")), "gpu", 1)
    assert pcba["surrogates_to_train"] == 1
