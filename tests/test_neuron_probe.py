"""The neuron probe (benchmarks/neuron_probe.py) on the digits BadNets victim."""

import copy

import pytest
import torch

from benchmarks.neuron_probe import (
    clean_gradients,
    complete,
    markdown,
    masked_tensors,
    parse_defense,
    probe,
    ranks,
    scaled_copy,
    spearman,
    top_k_factor,
)
from benchmarks.run import Paths
from defenses.masking import neuron_modules
from tasks import CleanBudget


def test_defence_specs_parse():
    assert parse_defense("nft[mixup=False,eta=0]") == ("nft", {"mixup": False, "eta": 0})
    assert parse_defense("anp") == ("anp", {})
    for bad in ("nft[mixup=False", "nft[mixup]"):
        with pytest.raises(ValueError, match="defence spec"):
            parse_defense(bad)


def test_rank_correlation_averages_ties():
    assert ranks(torch.tensor([3.0, 1.0, 1.0, 2.0])).tolist() == [3.0, 0.5, 0.5, 2.0]
    # a binary mask (ANP's): Pearson on average ranks = 2 / sqrt(5) (breaking ties by index would give 0.6)
    rho = spearman(torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert rho == pytest.approx(2 / 5 ** 0.5, abs=1e-6)


def test_scaled_copy_scales_exactly_the_first_k(badnets_victim, digits_task):
    _, model, _, _ = badnets_victim
    target = digits_task.mask_target
    before = torch.cat([w for _, w in masked_tensors(model, target)])
    order = torch.randperm(len(before), generator=torch.Generator().manual_seed(0))
    for scale in (0.0, 0.25):
        scaled = scaled_copy(model, target, top_k_factor(order, 5, scale))
        after = torch.cat([w for _, w in masked_tensors(scaled, target)])
        changed = torch.nonzero(after != before).flatten()
        assert sorted(changed.tolist()) == sorted(order[:5].tolist())
        assert torch.allclose(after[changed], scale * before[changed])


def test_probe_reads_each_defences_masks_back(trained_badnets_victim, runs_dir, digits_task):
    _, _, meta, d = trained_badnets_victim
    report = probe(d, ["anp[iterations=40]", "nft[steps=40]"], Paths(runs_dir=runs_dir), CleanBudget(0.05), 0,
                   images=200)
    assert report["neurons"] == sum(report["layers"].values()) and report["before"] == meta["metrics"]
    assert [len(by_k) for by_k in report["oracle"].values()] == [5, 5, 5]
    assert sum(report["top_responders_per_layer"].values()) == 64
    anp = report["defenses"]["anp[iterations=40]"]
    assert anp["neurons_pruned"] > 0 and anp["below_0.5"] == anp["neurons_pruned"]  # pruned read back as mask 0
    nft = report["defenses"]["nft[steps=40]"]
    for row in nft["top_k"].values():  # NFT's masks are clamped to [floor, 1]
        assert 0 <= row["mean_mask_top"] <= 1 and 0 <= row["mean_mask_rest"] <= 1
    assert -1 <= nft["spearman_response_vs_1_minus_mask"] <= 1
    cg = report["clean_gradient"]
    per_class = digits_task.samples_per_class(digits_task.clean_split(CleanBudget(0.05), 0))
    assert cg["nft_regulariser_per_mask"] == pytest.approx(1e-3 / per_class)
    assert set(cg["per_neuron"]) == {"mixup", "plain"}
    assert all(len(v) == report["neurons"] for g in cg["per_neuron"].values() for v in g.values())
    assert set(nft["clean_gradient_after"]["16"]) == {"mixup", "plain"}
    # ANP's masks are its whole change (pruning, BN statistics untouched): alone on the victim they give its result
    assert anp["masks_on_victim"] == pytest.approx(anp["after"], abs=1e-9)
    old = {**report, "defenses": {s: {k: v for k, v in d.items() if k != "masks_on_victim"}
                                  for s, d in report["defenses"].items()}}
    assert complete(old, Paths(runs_dir=runs_dir))["defenses"] == report["defenses"]
    table = markdown([report]).splitlines()
    assert table[2].startswith("| badnets | ") and len(table) == 2 + 3 + 1 + 2 + 2 + 1 + 2 + 2 * 3
    assert table[8].startswith("| badnets | anp[iterations=40] | ") and f"| {anp['below_0.5']} |" in table[8]
    assert table[8].endswith(f"{100 * anp['after']['asr']:.1f} |")
    assert table[13].startswith("| badnets | mixup, victim | ") and table[14].startswith("| badnets | plain, victim | ")
    assert table[-1].startswith("| badnets | plain, after nft[steps=40] | ")


def test_clean_gradients_match_the_scale_gradient_by_hand(badnets_victim, digits_task):
    """d loss / d mask_c at mask 1 is w_c * d loss / d w_c for a BN weight w (the mask multiplies it)."""
    _, model, _, _ = badnets_victim
    clean = digits_task.clean_split(CleanBudget(0.05), 0)
    grads = clean_gradients(digits_task, model, clean, batches=1, batch_size=32, seed=0)["plain"]["signed"]
    twin = copy.deepcopy(model).train()
    batch = digits_task.sample_batch(clean, 32, torch.Generator().manual_seed(0), augment=True)
    layers = [m for _, m, _, _ in neuron_modules(twin, digits_task.mask_target, set(getattr(twin, "mask_exclude", ())))]
    for m in layers:
        m.weight.requires_grad_(True)
    digits_task.loss(twin, batch).backward()
    by_hand = torch.cat([(m.weight * m.weight.grad).detach().flatten() for m in layers])
    assert torch.allclose(grads, by_hand, rtol=1e-4, atol=1e-7)
    assert grads.abs().sum() > 0
