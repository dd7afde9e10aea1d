"""End to end on sklearn's digits: victims, NFT, records, CLI, determinism, NaN handling."""

import copy
import json

import pytest
import torch
from conftest import TEST_THREADS

from benchmarks.cli import main
from benchmarks.run import Paths, RunConfig, defend, run_once
from tasks import CleanBudget
from training.victims import get_victim

RECORD_FIELDS = {"run_id", "status", "config", "victim_id", "victim_train_time_s", "before", "after", "der",
                 "defense_info", "versions", "device", "precision", "torch_threads", "clean_samples", "started",
                 "finished"}


def test_digits_badnets_victim_is_accurate_and_backdoored(badnets_victim):
    _, _, meta, d = badnets_victim
    # measured (seeds 0-2 fp32 and bf16, seed 0 at 2 threads): clean accuracy 0.987-0.993, ASR 1.0
    assert meta["metrics"]["clean_acc"] >= 0.90
    assert meta["metrics"]["asr"] >= 0.90
    assert meta["poisoned_samples"] == round(0.1 * meta["train_samples"])
    assert (d / "model.safetensors").is_file() and meta["config"]["attack"]["name"] == "badnets"
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["precision"] == "fp32" and meta["torch_threads"] == TEST_THREADS  # the suite's (conftest)


def test_victim_is_cached_not_retrained(digits_task, runs_dir, badnets_victim):
    attack, _, meta, d = badnets_victim
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    _, meta2, d2 = get_victim(digits_task, attack, 0, runs_dir)
    assert d2 == d and meta2 == meta and (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_nft_runs_and_record_has_every_field(digits_task, badnets_victim):
    attack, model, meta, _ = badnets_victim
    record, purified = defend(digits_task, attack, model, meta, "nft", {"steps": 100}, CleanBudget(0.05), seed=0)
    assert record["status"] == "ok", record.get("error")
    assert RECORD_FIELDS <= set(record)
    assert (record["precision"], record["torch_threads"]) == ("fp32", TEST_THREADS)
    assert record["config"]["precision"] == "fp32"  # set explicitly (conftest): part of the run id
    assert set(record["after"]) == {"clean_acc", "asr", "ra"}
    info = record["defense_info"]
    assert info["steps"] == 100 and info["forward_passes"] == 100 and info["wall_time_s"] > 0
    assert info["mask_layers"] == 6 and 0 < info["mask_mean"] <= 1
    assert record["clean_samples"] == round(0.05 * len(digits_task.data.train))
    assert not any("parametrizations" in k for k in purified.state_dict())


def test_clean_split_is_disjoint_from_attacker_training(digits_task):
    one = digits_task.clean_split(CleanBudget(None, per_class=1), seed=0)
    assert sorted(one.y.tolist()) == list(range(10))
    reserve = set(digits_task.reserve_idx.tolist())
    assert reserve.isdisjoint(digits_task.attacker_idx.tolist())
    assert len(reserve) + len(digits_task.attacker_idx) == len(digits_task.data.train)
    with pytest.raises(ValueError, match="reserve"):
        digits_task.clean_split(CleanBudget(0.5), seed=0)


def test_same_seed_same_record_numbers(digits_task, badnets_victim):
    attack, model, meta, _ = badnets_victim
    r1, _ = defend(digits_task, attack, copy.deepcopy(model), meta, "nft", {"steps": 30}, CleanBudget(0.05), seed=1)
    r2, _ = defend(digits_task, attack, copy.deepcopy(model), meta, "nft", {"steps": 30}, CleanBudget(0.05), seed=1)
    assert r1["after"] == r2["after"] and r1["defense_info"]["loss_trace"] == r2["defense_info"]["loss_trace"]


def test_nan_loss_gives_an_error_record(digits_task, badnets_victim, monkeypatch):
    attack, victim, meta, _ = badnets_victim
    model = copy.deepcopy(victim)
    monkeypatch.setattr(type(digits_task), "mixup_loss", lambda self, m, b, a, g: m(b.inputs).sum() * float("nan"))
    record, purified = defend(digits_task, attack, model, meta, "nft", {"steps": 5}, CleanBudget(0.05), seed=0)
    assert record["status"] == "error" and "NonFiniteLossError" in record["error"] and purified is None
    assert model.state_dict().keys() == victim.state_dict().keys()  # masks detached, weights restored
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in victim.named_parameters())


def test_cli_run_purify_and_blend(runs_dir, tmp_path, capsys, badnets_victim):
    _, _, _, vdir = badnets_victim
    main(["purify", "--victim", str(vdir), "--defense", "nft", "--per-class", "1", "--set", "steps=20",
          "--device", "cpu", "--runs-dir", str(runs_dir)])
    out = capsys.readouterr().out
    assert "after:" in out
    (purified,) = (vdir / "purified").iterdir()
    record = json.loads((purified / "record.json").read_text())
    assert record["config"]["budget"] == "1/class" and record["clean_samples"] == 10
    assert (purified / "model.safetensors").is_file()
    assert (runs_dir / "records" / f"{record['run_id']}.json").is_file()  # the leaderboard's input, as run's
    assert f"{record['run_id']},ok," in (runs_dir / "results.csv").read_text()

    csv = tmp_path / "res.csv"
    main(["run", "--dataset", "digits", "--attack", "blend", "--defense", "nft", "--val-frac", "0.05",
          "--set", "steps=20", "--device", "cpu", "--runs-dir", str(runs_dir), "--results", str(csv)])
    rows = csv.read_text().splitlines()
    assert len(rows) == 2 and ",blend,nft[steps=20],0.05," in rows[1]
    assert f"victim: {runs_dir / 'victims'}" in capsys.readouterr().out


def test_run_once_blend_victim_is_backdoored(runs_dir, tmp_path):
    cfg = RunConfig(dataset="digits", attack="blend", defense="none")
    record = run_once(cfg, Paths(runs_dir=runs_dir, device="cpu"), records_dir=tmp_path)
    assert record["status"] == "ok"
    assert record["before"]["clean_acc"] >= 0.9 and record["before"]["asr"] >= 0.9  # measured 0.983-0.993, 1.0
    assert record["after"] == record["before"] and record["der"] == 0.5
    assert (tmp_path / f"{record['run_id']}.json").is_file()


def test_cli_errors_name_the_fix(capsys, runs_dir, tmp_path):
    for argv, expected in [
        (["run", "--attack", "badnetz"], "Did you mean 'badnets'"),
        (["run", "--defense", "nfts"], "Valid defences"),
        (["run", "--dataset", "cifar10", "--data-root", str(tmp_path)], "CIFAR-10 not found. Looked in"),
        (["run", "--set", "stepz=3"], "no option"),
        (["purify", "--victim", str(tmp_path)], "not a victim directory"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--device", "cpu", "--runs-dir", str(runs_dir)])
        assert e.value.code == 2
        assert expected in capsys.readouterr().err


def test_list_shows_registries(capsys):
    main(["list"])
    out = capsys.readouterr().out
    for name in ("image", "digits", "cifar10", "preact-resnet18", "badnets", "blend", "nft"):
        assert name in out


def test_poisoned_training_batches_carry_the_trigger_and_the_target_label(digits_task):
    from attacks import create_attack

    train, idx = digits_task.attacker_train(create_attack("badnets"), seed=0)
    assert len(idx) == round(0.1 * len(train)) and int(train.poisoned.sum()) == len(idx)
    b = digits_task.make_batch(train, idx[:16], augment=False, generator=None)
    assert (b.inputs[..., -3:, -3:] == 1).all() and (b.targets == 0).all()
    clean_idx = torch.nonzero(~train.poisoned).flatten()[:64]
    c = digits_task.make_batch(train, clean_idx, augment=False, generator=None)
    assert not (c.inputs[..., -3:, -3:] == 1).flatten(1).all(1).any()
    assert torch.equal(c.targets, digits_task.data.train.y[digits_task.attacker_idx][clean_idx])
