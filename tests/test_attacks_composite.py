"""CBA (attacks/image_composite.py): the half-concatenation mixer, poisoning restricted to the two trigger classes,
composite test triggers, and a backdoored digits victim."""

import math

import pytest
import torch
from conftest import DIGITS_ACC_ALLOWANCE, asr_floor

from attacks import create_attack

# Digits: the authors' mix_rate 0.5 turns half of every batch into composites; the 30-epoch digits victim then loses
# 3.1 points of clean accuracy (0.956 vs 0.987). 0.25 keeps it within 2 points at the same ASR (seed 0: 0.969 / 0.963).
DIGITS = {"mix_rate": 0.25}


def test_half_mixer_takes_each_side_from_one_image_within_the_jitter():
    attack = create_attack("cba", jitter=2)
    a = torch.rand(64, 3, 16, 16) + 2  # values in [2, 3): from a; in [0, 1): from b
    b = torch.rand(64, 3, 16, 16)
    out = attack.compose(a, b, torch.Generator().manual_seed(0))
    assert torch.equal(out, attack.compose(a, b, torch.Generator().manual_seed(0)))
    from_a = out[:, 0] >= 2
    cols, rows = from_a.all(1) | (~from_a).all(1), from_a.all(2) | (~from_a).all(2)
    split_cols = (from_a == from_a[:, :1, :]).all((1, 2))  # every row alike: the cut runs between columns
    kinds = set()
    for i in range(64):
        lines = from_a[i, 0] if split_cols[i] else from_a[i, :, 0]
        first = bool(lines[0])
        cut = int((lines == first).long().cumprod(0).sum())
        assert (lines[:cut] == first).all() and (lines[cut:] != first).all()  # two contiguous parts
        assert 8 - 2 <= cut <= 8 + 2  # L/2 + j, |j| <= jitter
        assert (cols[i] if split_cols[i] else rows[i]).all()
        kinds.add((bool(split_cols[i]), first))
        src = a if first else b  # the first part is a contiguous window of its image
        part = out[i][:, :, :cut] if split_cols[i] else out[i][:, :cut, :]
        windows = [src[i][:, :, s: s + cut] if split_cols[i] else src[i][:, s: s + cut, :] for s in range(17 - cut)]
        assert any(torch.equal(part, w) for w in windows)
    assert len(kinds) == 4  # both axes, both orders


def test_parameters_and_classes_get_clear_errors(digits_task):
    for params, match in [({"class_a": 2}, "three different"), ({"mode": "all-to-all"}, "all-to-one"),
                          ({"mix_rate": 1.5}, "mix_rate"), ({"margin": 0}, "margin")]:
        with pytest.raises(ValueError, match=match):
            create_attack("cba", **params)
    with pytest.raises(ValueError, match="do not exist"):
        create_attack("cba", target=12).prepare(digits_task)
    with pytest.raises(ValueError, match="too large"):
        create_attack("cba", jitter=4).prepare(digits_task)
    with pytest.raises(TypeError, match="two images"):
        create_attack("cba").apply(torch.rand(2, 1, 16, 16))


def test_poisoning_is_exact_seeded_and_only_from_the_two_classes(digits_task):
    attack = create_attack("cba", **DIGITS)
    split, idx = digits_task.attacker_train(attack, 0)
    truth = digits_task.data.train.y[digits_task.attacker_idx]
    assert len(idx) == math.floor(0.1 * len(split) + 0.5)
    assert set(truth[idx].tolist()) == {0, 1} and (split.y[idx] == 2).all()
    assert torch.equal(digits_task.attacker_train(attack, 0)[1], idx)
    assert not torch.equal(digits_task.attacker_train(attack, 1)[1], idx)
    with pytest.raises(ValueError, match="of classes 0 or 1"):
        digits_task.attacker_train(create_attack("cba", poison_rate=0.5), 0)


def test_training_batch_composes_poisoned_rows_across_classes_and_mixes_others_within_a_class(digits_task):
    attack = create_attack("cba", mix_rate=0.5)
    split, _ = digits_task.attacker_train(attack, 0)
    truth = digits_task.data.train.y[digits_task.attacker_idx]
    clean = type(split)(split.x, truth)
    idx = torch.arange(256)
    batch = digits_task.make_batch(clean, idx, False, None)
    rows = split.poisoned[idx]
    x = attack.poison(digits_task, clean, batch, rows, torch.Generator().manual_seed(0))
    changed = (x != batch.inputs).flatten(1).any(1)
    assert changed[rows].all()
    assert 0.3 < changed[~rows].float().mean() < 0.7  # about mix_rate of the other rows
    assert torch.equal(x[~changed], batch.inputs[~changed])


def test_test_triggers_pair_the_two_classes_and_ra_counts_either_source(digits_task):
    attack = create_attack("cba")
    x, y = digits_task.test.x[:300].float() / 255, digits_task.test.y[:300]
    mixed, wanted, truth = attack.triggered_test(x, y, 10)
    assert len(mixed) == min(int((y == 0).sum()), int((y == 1).sum())) > 0
    assert (wanted == 2).all() and truth.shape == (len(mixed), 2) and (truth == torch.tensor([0, 1])).all()
    assert torch.equal(mixed, attack.triggered_test(x, y, 10)[0])


def test_digits_victim_is_backdoored_and_keeps_clean_accuracy(digits_victim, benign_acc):
    m = digits_victim("cba", **DIGITS)[2]["metrics"]
    # measured: ASR 0.926-0.982, clean accuracy up to 3.1 points under the benign model (conftest.ASR_FLOORS)
    assert m["asr"] >= asr_floor("cba") and m["clean_acc"] >= benign_acc - DIGITS_ACC_ALLOWANCE, (m, benign_acc)
