"""Learned, sample-specific attacks (attacks/image_generative.py): trigger budgets, exact seeded poisoning, and a
backdoored digits victim per attack whose saved trigger networks reproduce its ASR when reloaded."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DIGITS_ACC_ALLOWANCE, asr_floor

import attacks.image_generative as gen
import attacks.image_stego as stego
from attacks import create_attack
from benchmarks.run import Paths, load_victim
from tasks.image_classification import to_float, to_uint8
from training.victims import get_victim

# Digits-specific parameters (16x16 grey digits, a 30-epoch victim of ~510 steps, one CPU core), each with its reason:
DIGITS = {
    # The paper's mask density 0.032 masks ~8 of 256 pixels: the 30-epoch victim reaches only ~69% ASR. 0.15 masks
    # ~38, about the 33 pixels 0.032 masks on 32x32 CIFAR-10; alone it gives 0.70-0.89 by seed (0.25: 0.61-0.93).
    # Twice the poisoned rows (0.2) give 0.92-0.99.
    "input-aware": {"mask_density": 0.15, "poison_rate": 0.2},
    # eps 0.01 (~2.5 grey levels) needs the authors' thousands of generator steps; in 255 steps it stays noise
    # the victim cannot separate from clean digits. 0.05 learnt the trigger on seeds 0-1 and not at all on seed 2
    # (ASR 0.05); the authors' stage-1 eps 0.1 gives 1.0 on seeds 0-2.
    "lira": {"eps": 0.1},
    # 400 encoder steps (the default 3000 are minutes on one core) already decode 16 bits and keep PSNR > 25 dB.
    "issba": {"encoder_steps": 400},
}
PSNR_FLOOR_DB = 25.0  # ISSBA reports 27 dB on ImageNet; the digits encoder above: 26.6-28.7 dB (seeds 0-2)
BIT_ACCURACY_FLOOR = 0.95  # measured 0.9994-1.0 (seeds 0-2; the encoder trains outside autocast: fp32 = bf16)


def fake_task(shape, cache_dir=None, n=64):
    """The attributes ``prepare`` reads from an image task, for shapes no bundled dataset has."""
    data = SimpleNamespace(shape=shape, train=SimpleNamespace(x=torch.randint(0, 256, (n, *shape), dtype=torch.uint8)))
    return SimpleNamespace(data=data, device=torch.device("cpu"), cache_dir=cache_dir, attacker_idx=torch.arange(n),
                           config=lambda: {"fake": list(shape)})


@pytest.mark.parametrize("name", ["input-aware", "lira"])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_generators_are_sized_by_the_image_and_seeded(name, shape):
    task = fake_task(shape)
    attack = create_attack(name, seed=3)
    attack.prepare(task)
    nets = attack.nets
    attack.prepare(task)
    assert attack.nets is nets  # prepare is idempotent
    x = torch.rand(4, *shape)
    out = attack.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    twin = create_attack(name, seed=3)
    twin.prepare(task)
    assert torch.equal(out, twin.apply(x))
    other = create_attack(name, seed=4)
    other.prepare(task)
    assert not torch.equal(out, other.apply(x))


def test_issba_encoder_fits_rgb_images_and_is_cached(tmp_path, monkeypatch):
    task = fake_task((3, 32, 32), tmp_path)
    attack = create_attack("issba", encoder_steps=2)
    attack.prepare(task)
    assert len(attack.secret) == 100  # the paper's 100 bits from 32x32 up
    x = torch.rand(5, 3, 32, 32)
    out = attack.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    (cached,) = [d for d in (tmp_path / "attacks").iterdir() if d.is_dir()]
    assert {p.name for p in cached.iterdir()} >= {"encoder.safetensors", "encoder.json"}
    assert set(attack.stats) >= {"bit_accuracy", "psnr_db", "secret_bits"}

    monkeypatch.setattr(stego.Issba, "train_encoder", lambda *a: pytest.fail("the cached encoder was retrained"))
    again = create_attack("issba", encoder_steps=2, target=3, poison_rate=0.05)  # same encoder fields: shared
    again.prepare(task)
    assert torch.equal(again.apply(x), out)


def test_bad_parameters_get_clear_errors():
    for name, params, match in [
        ("input-aware", {"p_cross": 0.95}, "p_cross"), ("input-aware", {"mask_density": 0}, "mask_density"),
        ("input-aware", {"mask_epochs": 0}, "mask_epochs"), ("lira", {"eps": 0}, "eps"),
        ("lira", {"alpha": 1}, "alpha"), ("lira", {"stage1_fraction": 0}, "stage1_fraction"),
        ("issba", {"secret_bits": 0}, "secret_bits"), ("issba", {"encoder_steps": 0}, "encoder_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            create_attack(name, **params)


def test_input_aware_poison_batch_triggers_rows_and_draws_seeded_cross_samples():
    attack = create_attack("input-aware")
    attack.prepare(fake_task((1, 16, 16)))
    x = torch.rand(20, 1, 16, 16)
    rows = torch.zeros(20, dtype=torch.bool)
    rows[[2, 5, 11]] = True
    changed = (attack.poison_batch(x.clone(), rows, None) != x).flatten(1).any(1)
    assert torch.equal(changed, rows)  # no generator: nothing random, only the poisoned rows
    out = attack.poison_batch(x.clone(), rows, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1)
    assert changed[rows].all() and int((changed & ~rows).sum()) == round(0.1 * 20)  # p_cross of the batch
    assert torch.equal(out, attack.poison_batch(x.clone(), rows, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_poisoning_is_exact_seeded_and_only_on_poisoned_rows(digits_task, name):
    attack = create_attack(name, **DIGITS[name])
    split, idx = digits_task.attacker_train(attack, 0)
    assert len(idx) == math.floor(attack.poison_rate * len(split) + 0.5) == int(split.poisoned.sum())
    assert torch.equal(torch.nonzero(split.poisoned.cpu()).flatten(), idx)
    assert (split.y[idx] == 0).all()
    assert torch.equal(digits_task.attacker_train(attack, 0)[1], idx)
    assert not torch.equal(digits_task.attacker_train(attack, 1)[1], idx)
    clean = type(split)(split.x, split.y)
    rows = torch.arange(128)
    poisoned = digits_task.make_batch(split, rows, False, None).inputs
    changed = (poisoned != digits_task.make_batch(clean, rows, False, None).inputs).flatten(1).any(1)
    assert torch.equal(changed, split.poisoned[rows])


@pytest.mark.parametrize("mode", ["all-to-one", "all-to-all"])
def test_joint_training_poisons_an_exact_seeded_count_every_epoch(digits_task, mode):
    attack = create_attack("lira", mode=mode)
    split, idx = digits_task.attacker_train(attack, 0)
    truth = digits_task.data.train.y[digits_task.attacker_idx]

    def epochs(seed):
        g = torch.Generator().manual_seed(seed)
        return [part for _, part in gen.epoch_splits(digits_task, split, attack, 4, g)]

    parts = epochs(1)
    assert parts[0] is split  # the first epoch poisons the rows attacker_train reports
    for part in parts:
        rows = part.poisoned.cpu()
        assert int(rows.sum()) == len(idx)
        assert torch.equal(part.y.cpu()[rows], attack.poison_label(truth[rows], 10))
        assert torch.equal(part.y.cpu()[~rows], truth[~rows])
    assert not torch.equal(parts[1].poisoned, parts[2].poisoned)  # a fresh draw every epoch...
    assert all(torch.equal(a.poisoned, b.poisoned) for a, b in zip(parts, epochs(1), strict=True))  # ...seeded


@pytest.fixture(scope="module", params=sorted(DIGITS))
def victim(request, digits_victim):
    attack, model, meta, _ = digits_victim(request.param, **DIGITS[request.param])
    return attack, model, meta


def test_digits_victim_is_backdoored_and_keeps_clean_accuracy(victim, benign_acc, digits_task):
    attack, _, meta = victim
    metrics = meta["metrics"]
    assert metrics["asr"] >= asr_floor(attack.name), metrics  # floors and their spread: conftest.ASR_FLOORS
    assert metrics["clean_acc"] >= benign_acc - DIGITS_ACC_ALLOWANCE, (metrics, benign_acc)
    assert meta["poisoned_samples"] == math.floor(attack.poison_rate * len(digits_task.attacker_idx) + 0.5)


def test_cached_victim_restores_the_trigger_in_a_fresh_attack(victim, digits_task, runs_dir):
    attack, _, meta = victim
    fresh = create_attack(attack.name, **DIGITS[attack.name])
    model, again, _ = get_victim(digits_task, fresh, 0, runs_dir)
    assert again["victim_id"] == meta["victim_id"]
    assert digits_task.evaluate(model, fresh)["asr"] == meta["metrics"]["asr"]
    x = to_float(digits_task.test.x[:64])
    assert torch.equal(fresh.apply(x), attack.apply(x))


def test_victim_directory_reloads_with_its_trigger(victim, digits_task, runs_dir):
    """What `nftbench purify --victim DIR` and the probes do: task, attack and trigger rebuilt from the directory."""
    attack, _, meta = victim
    task, loaded, model, _ = load_victim(runs_dir / "victims" / meta["victim_id"], Paths(runs_dir, device="cpu"))
    assert task.evaluate(model, loaded)["asr"] == meta["metrics"]["asr"]
    x = to_float(digits_task.test.x[:64])
    assert torch.equal(loaded.apply(x), attack.apply(x))


def test_trained_trigger_is_sample_specific_and_within_budget(victim, digits_task):
    attack, _, _ = victim
    x = to_float(digits_task.test.x[:256])
    residual = to_float(to_uint8(attack.apply(x))) - x
    pair_distance = (residual - residual.roll(1, 0)).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert (pair_distance > 1e-3).float().mean() > 0.9  # a different trigger for (almost) every image
    if attack.name == "lira":
        assert (attack.apply(x) - x).abs().max() <= attack.eps + 1e-6
    elif attack.name == "input-aware":
        with torch.no_grad():
            masks, patterns = gen.threshold(attack.nets["M"](x)), attack.nets["G"](x)
        assert masks.min() >= 0 and masks.max() <= 1
        assert (patterns - patterns.roll(1, 0)).pow(2).mean(dim=(1, 2, 3)).sqrt().min() > 1e-3
        assert masks.mean() < 2 * attack.mask_density
    else:
        assert attack.stats["psnr_db"] >= PSNR_FLOOR_DB and attack.stats["bit_accuracy"] >= BIT_ACCURACY_FLOOR
        stored = to_float(to_uint8(attack.apply(x)))
        assert gen.psnr(stored, x).mean() >= PSNR_FLOOR_DB
        with torch.no_grad():
            bits = (attack.nets["decoder"](stored) > 0).float()
        assert (bits == attack.secret).float().mean() >= BIT_ACCURACY_FLOOR
