"""ANP (defenses/anp.py) on the digits BadNets victim, through ``purify`` (a defender's view: no test data)."""

import copy

import pytest
import torch
from torch import nn

from defenses import DEFENSES, purify
from defenses.anp import ANPConfig, adversarial_noise, optimize_masks
from defenses.masking import NeuronMasks
from tasks import CleanBudget


@pytest.fixture(scope="module")
def clean(digits_task):
    return digits_task.clean_split(CleanBudget(0.05), seed=0)


def bn_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def newly_zeroed(before, after):
    """Entries of the state dict that changed: they must all be BN weights set to 0."""
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    zeroed = 0
    for k in a:
        changed = a[k] != b[k]
        if changed.any():
            assert k.endswith(".weight") and k[: -len(".weight")] in bn_weights(before), k
            assert (b[k][changed] == 0).all(), k
            zeroed += int(changed.sum())
    return zeroed


def test_anp_prunes_and_keeps_the_architecture(badnets_victim, digits_task, clean):
    _, model, _, _ = badnets_victim
    out, info = purify("anp", copy.deepcopy(model), digits_task, clean, {"iterations": 100}, seed=0)
    assert type(out) is type(model) and not out.training
    assert not any("parametrizations" in k for k in out.state_dict())
    assert info["neurons_pruned"] >= 1 and info["threshold"] == 0.2  # measured 8-14 pruned
    # only BN weights of pruned channels differ (running statistics restored, survivors kept at mask 1)
    assert newly_zeroed(model, out) == info["neurons_pruned"]
    # every BN layer is masked, the stem included, as in the authors' NoisyBatchNorm2d network
    assert info["mask_layers"] == len(bn_weights(model))
    assert info["iterations"] == 100 and info["mask_forward_passes"] == 300 and info["mask_backward_passes"] == 200
    assert 0 <= info["clean_split_acc"] <= 1 and info["mask_min"] >= 0
    assert all(p.requires_grad for p in out.parameters())


def test_masks_stay_in_the_unit_interval(digits_task, badnets_victim, clean):
    model = copy.deepcopy(badnets_victim[1])
    for p in model.parameters():
        p.requires_grad_(False)
    seen = []

    def record(_, ms):
        seen.append([(float(m.detach().min()), float(m.detach().max())) for m in ms.masks])

    masks, _ = optimize_masks(model, digits_task, clean, ANPConfig(iterations=8, lr=2.0), seed=0, on_step=record)
    masks.remove(fold=False)
    assert len(seen) == 8
    lows = [lo for step in seen for lo, _ in step]
    assert min(lows) == 0.0 and max(hi for step in seen for _, hi in step) <= 1.0


def test_the_ascent_step_raises_the_loss(digits_task, badnets_victim, clean):
    model = copy.deepcopy(badnets_victim[1]).eval()
    masks = NeuronMasks(model, "bn_gamma", exclude=(), bias_noise=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = digits_task.sample_batch(clean, 128, g)
        state = g.get_state()
        start = adversarial_noise(digits_task, model, masks, batch, 0.4, 0, g)  # the random start only
        g.set_state(state)
        delta, xi = adversarial_noise(digits_task, model, masks, batch, 0.4, 1, g)
        for a, b in zip(start[0] + start[1], delta + xi, strict=True):
            assert a.abs().max() <= 0.4 and not b.requires_grad
            assert torch.allclose((b - a).abs()[b != a], torch.tensor(0.4))  # one sign step of eps
        with torch.no_grad():
            plain = digits_task.loss(model, batch)
            masks.set_noise(*start)
            at_start = digits_task.loss(model, batch)
            masks.set_noise(delta, xi)
            ascended = digits_task.loss(model, batch)
            masks.set_noise(None, None)
        assert ascended > at_start and ascended > plain
    masks.remove(fold=False)


@pytest.mark.parametrize("rule,value", [("number", 7), ("fraction", 0.05)])
def test_pruning_by_number_prunes_exactly_that_many(badnets_victim, digits_task, clean, rule, value):
    _, model, _, _ = badnets_victim
    cfg = {"iterations": 10, "prune_by": rule, "prune_value": value}
    out, info = purify("anp", copy.deepcopy(model), digits_task, clean, cfg, seed=0)
    expected = 7 if rule == "number" else round(0.05 * info["neurons_masked"])
    assert info["neurons_pruned"] == expected == newly_zeroed(model, out)


def test_clean_accuracy_rule_uses_only_the_clean_split(badnets_victim, digits_task, clean):
    _, model, _, _ = badnets_victim
    cfg = {"iterations": 10, "prune_by": "clean_acc", "acc_tolerance": 0.02}
    out, info = purify("anp", copy.deepcopy(model), digits_task, clean, cfg, seed=0)
    assert info["threshold_search"] and info["clean_split_acc"] >= info["clean_split_acc_unpruned"] - 0.02
    assert newly_zeroed(model, out) == info["neurons_pruned"]


def test_config_errors():
    spec = DEFENSES.get("anp")
    assert spec.make_config().eps == 0.4 and spec.make_config().prune_value == 0.2
    with pytest.raises(ValueError, match="prune_by"):
        spec.make_config({"prune_by": "asr"})
    with pytest.raises(ValueError, match="whole"):
        spec.make_config({"prune_by": "number", "prune_value": 2.5})
