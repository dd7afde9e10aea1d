"""FT, Fine-Pruning and CLP on the digits BadNets victim, through ``purify`` (a defender's view: no test data)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import load_checkpoint, save_checkpoint
from defenses import purify
from defenses.clp import channel_lipschitz, conv_bn_pairs
from tasks import CleanBudget


@pytest.fixture(scope="module")
def clean(digits_task):
    return digits_task.clean_split(CleanBudget(0.05), seed=0)


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def test_ft_changes_weights_and_keeps_clean_accuracy(digits_task, badnets_victim, clean):
    _, model, _, _ = badnets_victim
    out, info = purify("ft", copy.deepcopy(model), digits_task, clean, {"steps": 40, "batch_size": 64}, seed=0)
    assert same_architecture(out, model)
    assert info["steps"] == info["backward_passes"] == 40 and info["config"]["lr"] == 0.01
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, out.state_dict()[k])]
    assert any(k.endswith("conv.weight") for k in changed) and any(k.endswith("linear.weight") for k in changed)
    assert digits_task.accuracy(out, clean) > 0.8  # measured 1.0 (seeds 0-2 fp32, seed 0 bf16 and 2 threads)


def test_fine_pruning_prunes_persistently(digits_task, badnets_victim, clean, tmp_path):
    _, model, _, _ = badnets_victim
    out, info = purify("fine-pruning", copy.deepcopy(model), digits_task, clean, {"steps": 20, "batch_size": 64})
    assert same_architecture(out, model)
    assert info["feature_layer"] == "net.block3" and info["head"] == "net.linear"
    assert 1 <= info["channels_pruned"] < info["total_channels"] == out.net.linear.in_features
    assert info["prune_ratio"] == info["channels_pruned"] / info["total_channels"]
    assert info["steps"] == info["backward_passes"] == 20
    # the stop rule: the kept ratio is within tolerance on the clean split, the next one (if tried) was not
    floor = 0.9 * info["clean_split_acc_before"]
    if info["tolerance_met"]:
        assert info["clean_split_acc_pruned"] >= floor
        tried = dict(info["prune_trace"])
        nxt = info["channels_pruned"] + info["prune_step_channels"]
        assert nxt >= info["total_channels"] or tried[nxt] < floor
    pruned = torch.tensor(info["pruned_channels"])
    assert len(pruned) == info["channels_pruned"]
    assert (out.net.linear.weight[:, pruned] == 0).all()
    assert (out.net.linear.weight.abs().sum(0) > 0).sum() == info["total_channels"] - info["channels_pruned"]
    # the pruning survives a safetensors round trip into a fresh model
    save_checkpoint(tmp_path, out, {"defense": "fine-pruning"})
    loaded = load_checkpoint(tmp_path / "model.safetensors", digits_task.build_model()).eval()
    assert (loaded.net.linear.weight[:, pruned] == 0).all()
    x = next(iter(digits_task.iter_batches(clean, 64))).inputs
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))


class NoDataTask:
    """A task for a data-free defence: it has a device and nothing else."""

    def __init__(self, device):
        self.device = device

    def defender_ops(self):  # what purify builds the defence's view from
        return self

    def __getattr__(self, name):
        raise AssertionError(f"a data-free defence called task.{name}")


def reference_selection(conv: nn.Module, bn: nn.Module, u: float) -> list[int]:
    """CLP's rule written out per channel, as in the authors' loop."""
    w, std = conv.weight.detach(), torch.sqrt(bn.running_var + bn.eps)
    lips = torch.stack([torch.linalg.svdvals(w[k].reshape(w.shape[1], -1)).max() * (bn.weight[k] / std[k]).abs()
                        for k in range(w.shape[0])]).detach()
    return torch.nonzero(lips > lips.mean() + u * lips.std()).flatten().tolist()


def test_clp_is_data_free_and_follows_its_rule(badnets_victim, digits_task):
    _, model, _, _ = badnets_victim
    victim = copy.deepcopy(model)
    pairs, unpaired = conv_bn_pairs(victim, torch.device("cpu"))
    assert len(pairs) == 7 and all(p.direct for p in pairs) and not unpaired  # QuickResNet: conv -> pool -> BN
    expected = {p.bn_name: reference_selection(p.conv, p.bn, 1.0) for p in pairs}
    out, info = purify("clp", victim, NoDataTask(digits_task.device), None, {"u": 1.0})
    assert same_architecture(out, model)
    assert info["steps"] == info["backward_passes"] == info["clean_samples"] == 0
    assert info["pruned_channels"] == {k: v for k, v in expected.items() if v}
    assert info["channels_pruned"] == sum(map(len, expected.values())) > 0
    bns = dict(out.named_modules())
    for name, idx in info["pruned_channels"].items():
        assert (bns[name].weight[idx] == 0).all() and (bns[name].bias[idx] == 0).all()


class Planted(nn.Module):
    """conv1 -> max pool -> bn1; conv2 -> bn2 (a decoy 1x1 conv registered between them runs first);
    bn3 normalises a residual sum conv3(x) + x."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.decoy = nn.Conv2d(8, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.linear = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.pool(self.conv1(x))))
        x = self.decoy(x) + F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x) + x))
        return self.linear(x.mean((2, 3)))


def test_clp_prunes_the_planted_channel():
    torch.manual_seed(0)
    model = Planted().eval()
    with torch.no_grad():
        model.conv2.weight[5] *= 100
    pairs, _ = conv_bn_pairs(model, torch.device("cpu"))
    assert [(p.conv_name, p.bn_name, p.direct) for p in pairs] == [
        ("conv1", "bn1", True), ("conv2", "bn2", True), ("conv3", "bn3", False)]
    uclc = channel_lipschitz(model.conv2, model.bn2)
    assert uclc.argmax() == 5 and uclc[5] > uclc.mean() + 3 * uclc.std()
    out, info = purify("clp", copy.deepcopy(model), NoDataTask(torch.device("cpu")), None)
    assert info["pruned_channels"] == {"bn2": [5]} and info["residual_pairs"] == ["conv3 -> bn3"]
    assert out.bn2.weight[5] == 0 and out.bn2.bias[5] == 0 and (out.bn2.weight[:5] != 0).all()
    _, strict = purify("clp", copy.deepcopy(model), NoDataTask(torch.device("cpu")), None, {"pair_residual": False})
    assert strict["unpaired_bns"] == ["bn3"] and strict["layers"] == 2
