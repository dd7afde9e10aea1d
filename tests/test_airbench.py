"""The fast scale: airbench's network (Jordan 2024) and recipe, and the defences on it (issue 20)."""

import copy
import json

import pandas as pd
import pytest
import torch

from defenses import purify
from defenses.masking import NeuronMasks
from defenses.nft import layer_floors
from tasks import CleanBudget, create_task
from tasks.image_models import IMAGE_MODELS
from training.loop import Lookahead, recipe_optimizer, train_model, triangle


@pytest.fixture(scope="module")
def fast_task(runs_dir):
    """Digits (16x16, one channel) with the airbench model and the fast recipe: 16 -> 15 -> 7 -> 3 -> 1 pixels."""
    return create_task("image", dataset="digits", model="airbench", scale="fast", device="cpu", cache_dir=runs_dir)


def short_recipe(task, **over):
    return {**task.recipe(), "epochs": 3, "batch_size": 128, "early_param_epochs": 1, **over}


@pytest.fixture(scope="module")
def fast_victim(fast_task):
    """A benign airbench digits model trained with the fast recipe for 3 short epochs (about 2 s)."""
    train, _ = fast_task.attacker_train(None, 0)
    return train_model(fast_task, train, short_recipe(fast_task), seed=0)


def test_airbench_shape_matches_the_paper():
    net = IMAGE_MODELS.get("airbench")(num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == 1_972_792  # the paper's 1.97M
    assert net.whiten.out_channels == 24 and not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(not bn.weight.requires_grad and bn.eps == 1e-12 and bn.momentum == 0.4 for bn in bns)
    assert net.linear.bias is None
    # dirac initialisation: the first conv of block 2 passes its 64 input channels straight through
    w = net.block2.conv1.weight
    assert torch.equal(w[:64, :, 1, 1], torch.eye(64)) and w[:64].abs().sum() == 64
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_whitening_matches_a_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1) + 0.5
    net = IMAGE_MODELS.get("airbench")(num_classes=4, in_channels=2)
    net.init_from_data(x)
    # every 2x2 patch by hand, flattened in the conv weight's (channel, row, column) order
    patches = torch.stack([x[n, :, i:i + 2, j:j + 2].flatten() for n in range(3) for i in range(4) for j in range(4)])
    cov = patches.T @ patches / len(patches)
    eigenvalues = torch.linalg.eigvalsh(cov).flip(0)  # largest first
    filters = net.whiten.weight.detach().flatten(1)
    half = filters[:8]
    assert torch.allclose(filters[8:], -half)
    # each filter is an eigenvector of the covariance, of norm 1 / sqrt(eigenvalue + eps), largest first
    assert torch.allclose(half @ cov, eigenvalues[:, None] * half, atol=1e-4)
    assert torch.allclose(half.norm(dim=1), 1 / (eigenvalues + 5e-4).sqrt(), rtol=1e-4)
    out = patches @ half.T  # the whitened patches: uncorrelated, second moments lambda / (lambda + eps)
    assert torch.allclose(out.T @ out / len(out), torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=1e-4)


def test_task_initialises_whitening_from_the_attackers_images(fast_task):
    a, b = fast_task.build_model(), fast_task.build_model()
    assert torch.equal(a.net.whiten.weight, b.net.whiten.weight)  # data-dependent, not random
    assert a.net.whiten.weight.abs().sum() > 0


def test_schedule_groups_and_lookahead(fast_task):
    model = fast_task.build_model()
    recipe = short_recipe(fast_task)
    opt, sched = recipe_optimizer(model, recipe, n=256)  # 2 steps per epoch, 6 in all
    assert isinstance(sched, Lookahead)
    by_kind = {(round(g["initial_lr"] / recipe["lr"], 6), g["early"]): g for g in opt.param_groups}
    assert set(by_kind) == {(1.0, False), (1.0, True), (64.0, False)}  # weights, whitening bias, BN biases x64
    assert by_kind[1.0, True]["params"] == [model.net.whiten.bias]
    for g in opt.param_groups:  # decoupled: lr x decay is the recipe's decay in every group
        assert g["initial_lr"] * g["weight_decay"] == pytest.approx(recipe["weight_decay"])
    f = triangle(6, 0.23, 0.2, 0.07)
    assert [round(f(s), 4) for s in (0, 1, 6)] == [0.2, 1.0, 0.07]
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] / g["initial_lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    early = [i for i, g in enumerate(opt.param_groups) if g["early"]][0]
    assert [round(r[early], 4) for r in lrs] == [0.2, 1.0, 0.0, 0.0, 0.0, 0.0]  # trained for 1 epoch (2 steps)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sched.average.items())  # the model ends on the average


def test_fast_recipe_trains_and_keeps_its_frozen_parts(fast_task, fast_victim):
    fresh = fast_task.build_model()
    assert torch.equal(fast_victim.net.whiten.weight, fresh.net.whiten.weight)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in fast_victim.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(fast_victim.net.whiten.bias, fresh.net.whiten.bias)
    # 3 epochs of 8 steps reach 97-98% on digits test (fp32, seed 0, 1 and 2 threads); a broken recipe stays < 50%
    assert fast_task.evaluate(fast_victim, None)["clean_acc"] > 0.9


def test_nft_masks_the_six_bns_and_folds_back(fast_task, fast_victim):
    masks = NeuronMasks(copy.deepcopy(fast_victim))
    assert [layer.name for layer in masks.layers] == [f"net.block{b}.bn{i}" for b in (1, 2, 3) for i in (1, 2)]
    assert masks.num_neurons() == 2 * (64 + 256 + 256)
    floors = layer_floors(6, 0.8, 0.5)
    assert [round(f, 3) for f in floors] == [0.485, 0.294, 0.179, 0.108, 0.066, 0.04]
    clean = fast_task.clean_split(CleanBudget(0.05), seed=0)
    model = copy.deepcopy(fast_victim)
    out, info = purify("nft", model, fast_task, clean, {"steps": 20, "batch_size": 64}, seed=0)
    assert info["mask_layers"] == 6 and info["mask_neurons"] == 1152
    bns = [m for m in out.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in bns)
    scales = torch.cat([m.weight.detach() for m in bns])
    assert (scales < 1).any() and (scales >= 0.04 - 1e-6).all() and (scales <= 1).all()  # folded masks
    assert all(not m.weight.requires_grad for m in bns)  # airbench's BN scales stay frozen after NFT


@pytest.mark.parametrize("defense, params", [
    ("fine-pruning", {"steps": 4, "batch_size": 64}),
    ("nad", {"teacher_epochs": 1, "epochs": 1, "batch_size": 64}),
    ("i-bau", {"rounds": 1, "batch_size": 64}),
    ("clp", {}),
    ("anp", {"iterations": 4, "batch_size": 64}),
])
def test_baselines_apply_to_airbench(fast_task, fast_victim, defense, params):
    clean = fast_task.clean_split(CleanBudget(0.05), seed=0)
    out, info = purify(defense, copy.deepcopy(fast_victim), fast_task, clean, params, seed=0)
    x = next(iter(fast_task.iter_batches(clean, 32))).inputs
    assert torch.isfinite(out(x)).all()
    if defense == "fine-pruning":
        assert info["feature_layer"] == "net.block3" and info["total_channels"] == 256
    if defense == "clp":
        assert info["layers"] == 6 and not info["residual_pairs"]  # conv (-> pool) -> BN, all direct


def test_fast_scale_on_gtsrb_layout(tmp_path):
    """The recipe on another 32x32 dataset: a GTSRB stand-in in torchvision's layout (resized to 32x32)."""
    from PIL import Image

    g = tmp_path / "gtsrb"
    rng = torch.Generator().manual_seed(0)
    for c in range(3):
        folder = g / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(24):
            pixels = (torch.rand(36, 40, 3, generator=rng) * 60 + 80 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:04d}.ppm")
    test = g / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    for i in range(6):
        Image.fromarray((torch.rand(30, 30, 3, generator=rng) * 60 + 80 * (i % 3)).to(torch.uint8).numpy()).save(
            test / f"{i:04d}.ppm")
    (g / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                         + "".join(f"{i:04d}.ppm;30;30;1;1;29;29;{i % 3}\n" for i in range(6)))
    task = create_task("image", dataset="gtsrb", scale="fast", data_root=tmp_path, device="cpu",
                       cache_dir=tmp_path / "runs")
    assert task.model_name == "airbench" and task.data.shape == (3, 32, 32)
    train, _ = task.attacker_train(None, 0)
    model = train_model(task, train, short_recipe(task, batch_size=16), seed=0)
    # three colour classes, separable at a glance: 6/6 here (fp32 and bf16); one miss allowed, chance is 2/6
    assert task.evaluate(model, None)["clean_acc"] >= 5 / 6


def test_victim_table_reads_victims_of_the_registered_recipe(tmp_path, capsys):
    from benchmarks.victim_table import current_recipe, main

    def victim(vid, attack, seed, recipe, scale="fast"):
        d = tmp_path / "victims" / vid
        d.mkdir(parents=True)
        task = {"dataset": "cifar10", "scale": scale, "model": "airbench", "data_fingerprint": f"fp-{vid}"}
        meta = {"victim_id": vid, "config": {"task": task, "attack": attack, "seed": seed, "recipe": recipe},
                "metrics": {"clean_acc": 0.93, "asr": None if attack is None else 0.99, "ra": None},
                "train_time_s": 1800.0, "train_images_per_s": 480.0, "torch_threads": 2, "precision": "bf16"}
        (d / "victim.json").write_text(json.dumps(meta))

    recipe = current_recipe("cifar10", "fast")
    victim("a1", None, 0, recipe)
    victim("b2", {"name": "badnets"}, 1, recipe)
    victim("c3", None, 1, {**recipe, "epochs": 1})  # a recipe experiment
    victim("d4", None, 0, recipe, scale="quick")
    main(["--runs-dir", str(tmp_path), "--out", str(tmp_path / "v.csv")])
    table = pd.read_csv(tmp_path / "v.csv")
    assert table["victim_id"].tolist() == ["a1", "b2"] and table["train_min"].tolist() == [30.0, 30.0]
    assert table["data_fingerprint"].tolist() == ["fp-a1", "fp-b2"]
    main(["--runs-dir", str(tmp_path), "--all-recipes", "--out", str(tmp_path / "all.csv")])
    assert sorted(pd.read_csv(tmp_path / "all.csv")["victim_id"]) == ["a1", "b2", "c3"]
