import math

import pytest
import torch
from torch import nn

from defenses.masking import NeuronMasks
from defenses.nft import layer_floors
from tasks.image_models import IMAGE_MODELS, ImageClassifier


def make(name="resnet18-cifar", width=0.25):
    torch.manual_seed(0)
    net = IMAGE_MODELS.get(name)(num_classes=10, in_channels=3, width=width)
    model = ImageClassifier(net, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("target", ["bn_gamma", "bn_affine", "conv_out", "linear_out"])
def test_masks_at_one_are_bit_identical(target):
    model = make().eval()
    x = torch.rand(4, 3, 32, 32)
    ref = model(x)
    masks = NeuronMasks(model, target)
    assert torch.equal(model(x), ref)
    model.train()
    ref_train = make().train()(x)
    assert torch.equal(model(x), ref_train)
    masks.remove(fold=True)
    assert not any("parametrizations" in k for k in model.state_dict())


def test_layernorm_target_and_identity():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    ref = model(x)
    masks = NeuronMasks(model, "layernorm", exclude=())
    assert len(masks) == 1 and masks.num_neurons() == 16
    assert torch.equal(model(x), ref)


def test_nft_default_masks_19_layers_of_resnet18_without_the_stem():
    model = make()
    masks = NeuronMasks(model, "bn_gamma")
    assert len(masks) == 19
    assert all(layer.name != "net.bn1" for layer in masks.layers)
    assert "net.layer2.0.shortcut.1" in [layer.name for layer in masks.layers]


def test_mask_scales_gamma_only_and_folding_keeps_the_function():
    model = make().eval()
    x = torch.rand(2, 3, 32, 32)
    masks = NeuronMasks(model, "bn_gamma")
    bn = masks.layers[0].module
    gamma = bn.parametrizations.weight.original.clone()
    beta = bn.bias.clone()
    with torch.no_grad():
        for m in masks.masks:
            m.uniform_(0.2, 1.0)
    assert torch.allclose(bn.weight, gamma * masks.masks[0])
    assert torch.equal(bn.bias, beta)
    masked = model(x)
    masks.remove(fold=True)
    assert torch.allclose(model(x), masked, atol=1e-5)


def test_remove_without_fold_restores_the_original():
    model = make().eval()
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    masks = NeuronMasks(model, "bn_gamma")
    with torch.no_grad():
        masks.masks[3].zero_()
    assert not torch.equal(model(x), ref)
    masks.remove(fold=False)
    assert torch.equal(model(x), ref)


def test_clamp_holds_layer_floors_and_noise_perturbs():
    model = make()
    masks = NeuronMasks(model, "bn_gamma", bias_noise=True)
    floors = layer_floors(len(masks), 0.8, 0.5)
    assert floors[0] == pytest.approx(0.8 * 2.718281828 ** -0.5) and floors[2] == pytest.approx(0.1785, abs=1e-3)
    with torch.no_grad():
        for m in masks.masks:
            m.uniform_(-1, 2)
    masks.clamp_(floors, 1.0)
    for m, lo in zip(masks.masks, floors, strict=True):
        assert m.min() >= lo - 1e-7 and m.max() <= 1.0
    bn = masks.layers[0].module
    before_w, before_b = bn.weight.clone(), bn.bias.clone()
    masks.set_noise([torch.full_like(m, 0.1) for m in masks.masks], [torch.full_like(m, -0.5) for m in masks.masks])
    assert torch.allclose(bn.weight, before_w / masks.masks[0] * (masks.masks[0] + 0.1))
    assert torch.allclose(bn.bias, before_b * 0.5)
    masks.set_noise(None, None)
    assert torch.equal(bn.bias, before_b)


def test_conv_masks_before_a_train_mode_bn_learn_nothing():
    """Why nft[mask_target=conv_out] leaves its masks at 1 on conv -> BN networks (issue 9's study): BN in train
    mode normalises each channel by its batch statistics, so scaling a conv output channel cancels out; with BN
    statistics frozen (eval mode) the same masks do get a gradient."""
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def mean_grad(target, train):
        model = make("resnet-quick", width=1.0).train(train)  # every conv of resnet-quick feeds a BN
        masks = NeuronMasks(model, target)
        nn.functional.cross_entropy(model(x), y).backward()
        return torch.cat([p.grad.abs() for p in masks.masks]).mean().item()

    assert mean_grad("conv_out", True) < 1e-2 * mean_grad("bn_gamma", True)  # only BN's eps leaves a trace
    assert mean_grad("conv_out", False) > 100 * mean_grad("conv_out", True)


def test_unknown_target_and_empty_family_errors():
    with pytest.raises(ValueError, match="unknown mask target"):
        NeuronMasks(make(), "heads")
    with pytest.raises(ValueError, match="no layernorm modules"):
        NeuronMasks(make(), "layernorm")


def test_cutmix_pastes_one_box_and_weights_the_loss_by_its_area(digits_task, monkeypatch):
    import tasks.image_classification as ic
    from defenses import purify
    from tasks import Batch

    class Recorder(nn.Module):  # uniform logits: both CE terms are log 10, whatever the area
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, inputs):
            self.seen.append(inputs)
            return torch.zeros(len(inputs), 10)

    x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 10
    monkeypatch.setattr(ic, "beta_sample", lambda alpha, generator: 0.75)  # a box of side ~16 * sqrt(0.25) = 8
    model = Recorder()
    loss = digits_task.cutmix_loss(model, Batch(x, y), 1.0, torch.Generator().manual_seed(3))
    mixed = model.seen[0]
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    pasted = (mixed != x).any(1).any(0)  # (H, W): where the partners' pixels went
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    assert torch.equal(mixed[..., box[0], box[1]], x[perm][..., box[0], box[1]])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[box] = False
    assert torch.equal(mixed[..., outside], x[..., outside])  # one rectangle, the rest untouched
    assert 0 < pasted.float().mean() <= 0.25 + 1e-6
    assert torch.allclose(loss, torch.tensor(math.log(10)))
    with pytest.raises(ValueError, match="cutmix"):
        purify("nft", digits_task.build_model(), digits_task, None, {"mix": "cutmx"})
