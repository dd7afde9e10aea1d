import pytest
import torch

from attacks import create_attack, select_poison_indices
from tasks.base import UnknownNameError


def test_badnets_patch_is_white_3x3_bottom_right_and_nothing_else_changes():
    x = torch.rand(4, 3, 32, 32) * 0.5
    out = create_attack("badnets").apply(x)
    assert torch.all(out[:, :, 29:32, 29:32] == 1.0)
    changed = (out != x).any(dim=1)
    assert changed[:, :29, :].sum() == 0 and changed[:, :, :29].sum() == 0
    assert torch.equal(x, x.clone())  # input untouched


def test_badnets_position_size_and_pattern_are_configurable():
    x = torch.zeros(2, 1, 16, 16)
    out = create_attack("badnets", size=4, position="top-left", pattern="checkerboard").apply(x)
    patch = out[0, 0, :4, :4]
    assert patch[0, 0] == 1 and patch[0, 1] == 0 and patch[1, 1] == 1
    assert out[:, :, 4:, :].sum() == 0
    out = create_attack("badnets", size=2, position="5,7").apply(x)
    assert out[0, 0, 5:7, 7:9].sum() == 4 and out.sum() == 8
    with pytest.raises(ValueError, match="does not fit"):
        create_attack("badnets", size=3, position="15,15").apply(x)


def test_blend_is_alpha_mix_with_a_seeded_pattern():
    x = torch.rand(3, 3, 8, 8)
    a, b = create_attack("blend"), create_attack("blend")
    out = a.apply(x)
    pattern = (out - 0.8 * x) / 0.2
    assert torch.allclose(pattern[0], pattern[1], atol=1e-5)  # one pattern for every image
    assert pattern.min() >= -1e-5 and pattern.max() <= 1 + 1e-5
    assert torch.equal(out, b.apply(x))
    other = create_attack("blend", pattern_seed=7).apply(x)
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="alpha"):
        create_attack("blend", alpha=1.5)


def test_poison_count_is_exact_seeded_and_never_from_the_target_class():
    y = torch.arange(1000) % 10
    attack = create_attack("badnets", poison_rate=0.1, target=0)
    idx = select_poison_indices(y, attack, torch.Generator().manual_seed(3))
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert (y[idx] != 0).all()
    again = select_poison_indices(y, attack, torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)
    assert not torch.equal(idx, select_poison_indices(y, attack, torch.Generator().manual_seed(4)))
    assert len(select_poison_indices(y[:333], create_attack("badnets", poison_rate=0.05), torch.Generator())) == 17


def test_all_to_all_labels_and_asr_counting():
    y = torch.tensor([0, 1, 9])
    a2a = create_attack("badnets", mode="all-to-all")
    assert a2a.poison_label(y, 10).tolist() == [1, 2, 0]
    assert a2a.counts_for_asr(y).all()
    a2o = create_attack("badnets", target=1)
    assert a2o.poison_label(y, 10).tolist() == [1, 1, 1]
    assert a2o.counts_for_asr(y).tolist() == [True, False, True]
    idx = select_poison_indices(torch.arange(100) % 10, a2a, torch.Generator())
    assert len(idx) == 10


def test_bad_attack_input_gets_clear_errors():
    with pytest.raises(UnknownNameError, match="Valid attacks: .*badnets"):
        create_attack("badnet")
    with pytest.raises(ValueError, match="no option"):
        create_attack("badnets", colour="red")
    with pytest.raises(ValueError, match="poison_rate"):
        create_attack("badnets", poison_rate=2.0)
    with pytest.raises(ValueError, match="eligible"):
        select_poison_indices(torch.zeros(10, dtype=torch.long) + torch.arange(10).clamp(max=1),
                              create_attack("badnets", poison_rate=1.0), torch.Generator())
