"""The neuron probe (benchmarks/neuron_probe.py) on the digits BadNets victim."""

import pytest
import torch

from benchmarks.neuron_probe import markdown, masked_tensors, parse_defense, probe, ranks, scaled_copy, spearman
from benchmarks.run import Paths
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
        after = torch.cat([w for _, w in masked_tensors(scaled_copy(model, target, order, 5, scale), target)])
        changed = torch.nonzero(after != before).flatten()
        assert sorted(changed.tolist()) == sorted(order[:5].tolist())
        assert torch.allclose(after[changed], scale * before[changed])


def test_probe_reads_each_defences_masks_back(trained_badnets_victim, runs_dir):
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
    table = markdown([report]).splitlines()
    assert table[2].startswith("| badnets | ") and len(table) == 2 + 3 + 1 + 2 + 2
    assert table[8].startswith("| badnets | anp[iterations=40] | ") and f"| {anp['below_0.5']} |" in table[8]
