"""NFT's update rule pinned against a hand computation (issue 24): MixUp weighting, the regulariser's
``eta / N_c`` scale, the layer floors and the cosine lr schedule, over two steps of momentum SGD."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from defenses import purify
from tasks.base import Batch, beta_sample


class TinyTask:
    """Just what NFT uses: one fixed batch (drawing consumes no randomness), the image task's MixUp semantics."""

    mask_target = "bn_gamma"
    num_classes = 3
    device = torch.device("cpu")

    def __init__(self, x, y):
        self.batch = Batch(x, y)

    def defender_ops(self):  # what purify builds the defence's view from: this stub holds nothing but the batch
        return self

    def split_sizes(self, clean):
        return len(self.batch)

    def samples_per_class(self, clean):
        return len(self.batch) / self.num_classes

    def sample_batch(self, clean, batch_size, generator, augment=True):
        return self.batch

    def loss(self, model, batch, label_smoothing=0.0):
        return F.cross_entropy(model(batch.inputs), batch.targets)

    def mixup_loss(self, model, batch, alpha, generator):
        lam = beta_sample(alpha, generator)
        perm = torch.randperm(len(batch), generator=generator)
        logits = model(lam * batch.inputs + (1 - lam) * batch.inputs[perm])
        return lam * F.cross_entropy(logits, batch.targets) + (1 - lam) * F.cross_entropy(logits, batch.targets[perm])


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    return model


def hand_computed_masks(model: nn.Module, x, y, lr0: float, lr_end: float, eta: float, seed: int, steps: int = 3):
    """NFT by hand: masks m on the BN scale, loss = lam CE(y) + (1 - lam) CE(y[perm]) + eta |1 - m|_1 / N_c,
    momentum-0.95 SGD with a per-step cosine lr from lr0 to lr_end, clamp to [mu_1, 1]."""
    lin1, bn, lin2 = model[0], model[1], model[3]
    floor = 0.8 * math.exp(-0.5 * 1)  # mu_1 = alpha exp(-beta l), l = 1 (the only masked layer)
    n_c = len(y) / 3  # clean samples per class
    m = torch.ones(4, requires_grad=True)
    buf = None
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = lr_end + (lr0 - lr_end) * (1 + math.cos(math.pi * step / steps)) / 2
        lam = beta_sample(1.0, g)
        perm = torch.randperm(len(y), generator=g)
        h = lin1(lam * x + (1 - lam) * x[perm])
        h = F.batch_norm(h, None, None, bn.weight.detach() * m, bn.bias.detach(), training=True, eps=bn.eps)
        logits = lin2(F.relu(h))
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        total = loss + eta * (1 - m).abs().sum() / n_c
        (grad,) = torch.autograd.grad(total, m)
        buf = grad if buf is None else 0.95 * buf + grad
        with torch.no_grad():
            m = (m - lr * buf).clamp(floor, 1.0).requires_grad_(True)
    return m.detach(), floor


def test_nft_steps_match_a_hand_computation():
    torch.manual_seed(1)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    cfg = {"steps": 3, "lr": 2.0, "final_lr": 0.4, "momentum": 0.95, "eta": 0.1, "mixup_alpha": 1.0}
    out, info = purify("nft", tiny_model(), TinyTask(x, y), None, cfg, seed=7)
    m, floor = hand_computed_masks(tiny_model(), x, y, 2.0, 0.4, 0.1, seed=7)
    bn = tiny_model()[1]
    assert torch.allclose(out[1].weight, bn.weight * m, atol=1e-5), (out[1].weight / bn.weight, m)
    # the case exercises the floor, an interior mask and masks held at 1
    assert (m == floor).sum() == 1 and ((m > floor) & (m < 1)).sum() == 1 and (m == 1).sum() == 2
    assert info["mask_layers"] == 1 and info["mask_neurons"] == 4
    # and is sensitive to what it pins: the regulariser's scale (eta * N_c instead of eta / N_c)
    wrong_scale, _ = hand_computed_masks(tiny_model(), x, y, 2.0, 0.4, 0.1 * 16, seed=7)
    assert not torch.allclose(wrong_scale, m, atol=1e-3)
    # only the BN scale moved (the masks folded into it) and BN statistics (train mode); nothing else was trained
    ref = tiny_model().state_dict()
    changed = {k for k, v in out.state_dict().items() if v.is_floating_point() and not torch.equal(v, ref[k])}
    assert changed <= {"1.weight", "1.running_mean", "1.running_var"}
