"""Resumable victim training (training/resume.py): a training killed after an epoch and started again ends with the
model an uninterrupted run trains, bit for bit, for the task's recipe and for each attack that trains its victim in
its own loop; the state file is safetensors and is cleared once the victim is saved."""

import json

import pytest
import torch

import training.resume as resume
from attacks import create_attack
from common.checkpoint import CheckpointError, load_state_tree, save_state_tree
from tasks import create_task
from training.loop import train_model
from training.resume import EpochCheckpoint, TrainingState
from training.victims import RESUME_STATE, get_victim


class Killed(Exception):
    """Stands for the SIGKILL of a preempted job: raised right after a state is written."""


class KillSwitch:
    """While armed, the ``at``-th state a :meth:`TrainingState.save` writes (1: the first) raises :class:`Killed`."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.original, self.at, self.writes = monkeypatch, TrainingState.save, 1, 0
        switch = self

        def save(state, epochs_done, **extras):
            switch.original(state, epochs_done, **extras)
            if state.checkpoint is None:  # nothing was written
                return
            switch.writes += 1
            if switch.writes == switch.at:
                raise Killed(epochs_done)

        monkeypatch.setattr(TrainingState, "save", save)

    def disarm(self) -> None:
        self.monkeypatch.setattr(TrainingState, "save", self.original)


@pytest.fixture
def kill(monkeypatch):
    return KillSwitch(monkeypatch)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_tree_round_trips_nested_optimiser_state(tmp_path):
    tree = {"state": {0: {"momentum": torch.arange(3.0)}, 1: {"step": torch.tensor(4.0)}},
            "groups": [{"lr": 0.1, "betas": (0.5, 0.9), "params": [0, 1], "fused": None}], "$odd": "key",
            "rng": torch.Generator().manual_seed(3).get_state()}
    save_state_tree(tmp_path / "s.safetensors", tree, {"epochs": "3"})
    back, meta = load_state_tree(tmp_path / "s.safetensors")
    assert meta == {"epochs": "3"}
    assert set(back["state"]) == {0, 1} and torch.equal(back["state"][0]["momentum"], torch.arange(3.0))
    assert back["groups"][0]["betas"] == (0.5, 0.9) and back["groups"][0]["fused"] is None
    assert back["$odd"] == "key" and torch.equal(back["rng"], tree["rng"])
    with pytest.raises(TypeError, match="at /fn"):
        save_state_tree(tmp_path / "bad.safetensors", {"fn": len})
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 20)
    with pytest.raises(CheckpointError, match="pickle"):
        load_state_tree(tmp_path / "pickle.safetensors")


@pytest.fixture(scope="module")
def fast_digits(runs_dir):
    """Digits with airbench and the fast recipe: the most stateful loop (lookahead, triangle schedule, BN-bias lr
    group, whitening bias trained for early epochs only)."""
    task = create_task("image", dataset="digits", model="airbench", scale="fast", device="cpu", cache_dir=runs_dir)
    recipe = {**task.recipe(), "epochs": 3, "batch_size": 256, "early_param_epochs": 2}
    return task, task.attacker_train(None, 0)[0], recipe


def test_the_recipe_resumes_bit_for_bit(fast_digits, tmp_path, kill):
    task, train, recipe = fast_digits
    straight = train_model(task, train, recipe, seed=0)
    at = EpochCheckpoint(tmp_path / "resume.safetensors", every_s=0)
    with pytest.raises(Killed):
        train_model(task, train, recipe, seed=0, checkpoint=at)
    kill.disarm()
    again = EpochCheckpoint(at.path, every_s=0)
    resumed = train_model(task, train, recipe, seed=0, checkpoint=again)
    assert again.resumed and again.resumed_epoch == 1 and again.prior_s > 0
    assert same_weights(straight, resumed)


def test_a_state_of_another_training_is_refused(fast_digits, tmp_path):
    task, train, recipe = fast_digits
    at = EpochCheckpoint(tmp_path / "resume.safetensors", every_s=0)
    state = TrainingState(at, 5, generator=torch.Generator())
    state.epoch_done(0)
    with pytest.raises(CheckpointError, match="another training.*delete it"):
        train_model(task, train, recipe, seed=0, checkpoint=at)
    TrainingState(at, recipe["epochs"], generator=torch.Generator()).epoch_done(0)
    with pytest.raises(CheckpointError, match="does not fit this training.*delete it"):
        train_model(task, train, recipe, seed=0, checkpoint=at)


@pytest.mark.parametrize("name, params, killed_at, epochs_done", [
    ("input-aware", {}, 1, 0), ("input-aware", {}, 2, 1), ("lira", {"eps": 0.1}, 1, 1), ("cba", {}, 1, 1),
    ("fba", {"style_steps": 2, "detox_epochs": 1}, 1, 1)])
def test_attacks_training_their_victim_resume_bit_for_bit(name, params, killed_at, epochs_done, digits_task,
                                                          tmp_path, kill):
    """The run is killed after its ``killed_at``-th saved state, which holds ``epochs_done`` epochs (Input-aware
    saves one after its mask pre-training, before the first epoch, and one per epoch after that)."""
    recipe = {**digits_task.recipe(), "epochs": 3}
    attack = create_attack(name, **params)
    digits_task.check_attack(attack)
    train, _ = digits_task.attacker_train(attack, 0)
    straight = attack.train_victim(digits_task, train, recipe, 0)
    trigger = {k: v.clone() for k, v in attack.artifacts().items()}
    at = EpochCheckpoint(tmp_path / "resume.safetensors", every_s=0)
    kill.at = killed_at
    with pytest.raises(Killed) as killed:
        create_attack(name, **params).train_victim(digits_task, train, recipe, 0, at)
    kill.disarm()
    again = create_attack(name, **params)
    digits_task.check_attack(again)
    restart = EpochCheckpoint(at.path, every_s=0)
    resumed = again.train_victim(digits_task, train, recipe, 0, restart)
    assert killed.value.args[0] == epochs_done and restart.resumed and restart.resumed_epoch == epochs_done
    assert same_weights(straight, resumed)
    assert trigger.keys() == again.artifacts().keys()
    assert all(torch.equal(v, again.artifacts()[k]) for k, v in trigger.items())
    assert json.dumps(attack.victim_info(), default=str) == json.dumps(again.victim_info(), default=str)


def test_get_victim_resumes_and_clears_its_state(digits_task, digits_victim, tmp_path, monkeypatch, kill):
    monkeypatch.setattr(resume, "SAVE_EVERY_S", 0.0)
    attack = create_attack("badnets", seed=0)
    with pytest.raises(Killed):
        get_victim(digits_task, attack, 0, tmp_path)
    (state,) = (tmp_path / "victims").glob(f"*/{RESUME_STATE}")
    kill.disarm()
    model, meta, d = get_victim(digits_task, attack, 0, tmp_path)
    assert d == state.parent and not state.exists()
    assert meta["resumed_at_epoch"] == 1 and meta["train_time_s"] > 0
    _, straight, meta2, _ = digits_victim("badnets", seed=0)  # the session's uninterrupted victim of this config
    assert "resumed_at_epoch" not in meta2 and meta2["victim_id"] == d.name
    assert same_weights(model, straight) and meta["metrics"] == meta2["metrics"]
