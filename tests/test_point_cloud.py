"""The point-cloud task: procedural data, ModelNet loader, PointBA / PCBA triggers, RSMix, PointNet, and NFT and
every baseline through the task protocol on a PointBA-I victim (128 points, pointnet-small, 6 epochs)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import tasks.point_cloud as pc
from attacks import ATTACKS, create_attack
from attacks.pointcloud import median_knn_distance, sphere_pattern
from benchmarks.records import write_record
from benchmarks.run import defend
from defenses import DEFENSES, purify
from defenses.clp import conv_bn_pairs
from defenses.fine_pruning import channel_activations, pruning_point
from defenses.masking import NeuronMasks
from tasks import Batch, CleanBudget, create_task
from tasks.point_data import (
    PROCEDURAL_FAMILIES,
    DatasetNotFoundError,
    load_point_dataset,
    mesh_to_points,
    procedural_clouds,
)
from tasks.point_models import POINTCLOUD_MODELS, feature_transform_regularizer
from training.victims import get_victim

POINTS = 128


@pytest.fixture(scope="module")
def pc_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("pc-runs")


@pytest.fixture(scope="module")
def pc_task(pc_runs):
    task = create_task("pointcloud", dataset="procedural", device="cpu", cache_dir=pc_runs, num_points=POINTS)
    recipe = {**task.recipe(), "epochs": 6, "step_epochs": 3}
    task.recipe = lambda: recipe  # a shorter victim recipe for the test (it is part of the victim's hash)
    return task


@pytest.fixture(scope="module")
def pc_victim(pc_task, pc_runs):
    attack = create_attack("pointba-i", seed=0, num_points=16)
    model, meta, _ = get_victim(pc_task, attack, 0, pc_runs)
    return attack, model, meta


# --- data ----------------------------------------------------------------------------------------------
def test_procedural_dataset_families_shapes_and_determinism(pc_task):
    assert len(PROCEDURAL_FAMILIES) >= 10 and pc_task.num_classes == len(PROCEDURAL_FAMILIES)
    assert pc_task.data.classes[0] == "sphere"  # the default target: the one family a rotation leaves unchanged
    train, test = pc_task.data.train, pc_task.data.test
    assert train.x.shape == (150 * len(PROCEDURAL_FAMILIES), POINTS, 3) and train.x.dtype == torch.float32
    assert test.x.shape == (50 * len(PROCEDURAL_FAMILIES), POINTS, 3)
    assert torch.bincount(train.y).tolist() == [150] * len(PROCEDURAL_FAMILIES)
    norms = train.x.norm(dim=-1).amax(dim=1)
    assert (norms > 0.95).all() and (norms < 1.1).all()  # unit sphere + noise
    assert train.x.mean(dim=1).abs().max() < 0.05
    a, ya = procedural_clouds(3, 64, seed=7)
    b, yb = procedural_clouds(3, 64, seed=7)
    c, _ = procedural_clouds(3, 64, seed=8)
    assert (a == b).all() and (ya == yb).all() and not (a == c).all()
    # a second load reads the cache: same arrays, same fingerprint
    again = load_point_dataset("procedural", "unused", pc_task.cache_dir, num_points=POINTS)
    assert again.fingerprint == pc_task.data.fingerprint and torch.equal(again.train.x, train.x)


def write_off(path, verts, faces, glued=False):
    head = f"OFF{len(verts)} {len(faces)} 0\n" if glued else f"OFF\n{len(verts)} {len(faces)} 0\n"
    body = "".join(f"{x} {y} {z}\n" for x, y, z in verts) + "".join(f"{len(f)} {' '.join(map(str, f))}\n"
                                                                     for f in faces)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + body)


CUBE_V = [(x, y, z) for x in (0, 2) for y in (0, 2) for z in (0, 2)]
CUBE_F = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]  # quads
TETRA_V = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
TETRA_F = [(0, 2, 1), (0, 1, 3), (0, 3, 2), (1, 2, 3)]


def test_off_parser_and_modelnet_loader(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_off(root / "ModelNet40" / "bathtub" / split / f"bathtub_{i:04d}.off", CUBE_V, CUBE_F, glued=i == 0)
            write_off(root / "ModelNet40" / "airplane" / split / f"airplane_{i:04d}.off", TETRA_V, TETRA_F)
    glued = mesh_to_points(str(root / "ModelNet40" / "bathtub" / "train" / "bathtub_0000.off"), 32, seed=0)
    assert glued.shape == (32, 3)  # the "OFF8 6 0" header ModelNet has, read by torch-geometric
    data = load_point_dataset("modelnet40", root, tmp_path / "cache", num_points=64)
    assert data.classes == ["airplane", "bathtub"]  # sorted class folders
    assert data.train.x.shape == (6, 64, 3) and data.test.x.shape == (4, 64, 3)
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    norms = data.train.x.norm(dim=-1)
    assert torch.allclose(norms.amax(dim=1), torch.ones(6), atol=1e-5)  # unit sphere
    cube = data.train.x[3]  # every sampled point lies on one of the cube's faces (the extreme planes)
    to_face = torch.minimum((cube - cube.amin(dim=0)).abs(), (cube - cube.amax(dim=0)).abs()).amin(dim=1)
    assert to_face.max() < 1e-5
    fresh = load_point_dataset("modelnet40", root, tmp_path / "cache2", num_points=64)
    assert torch.equal(fresh.train.x, data.train.x) and fresh.fingerprint == data.fingerprint  # seeded
    task = create_task("pointcloud", dataset="modelnet40", data_root=root, cache_dir=tmp_path / "cache",
                       num_points=64, device="cpu")
    assert task.num_classes == 2 and task.config()["num_points"] == 64
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_point_dataset("modelnet10", root, tmp_path / "cache", num_points=64)


def test_modelnet_layouts_and_bad_meshes(tmp_path):
    """torch-geometric's raw layout is found too; a broken mesh is one error naming the file."""
    root = tmp_path / "data"
    for c in ("chair", "desk"):
        for split in ("train", "test"):
            write_off(root / "ModelNet10" / "raw" / c / split / f"{c}_0001.off", TETRA_V, TETRA_F)
    data = load_point_dataset("modelnet10", root, tmp_path / "cache", num_points=16)
    assert data.classes == ["chair", "desk"] and data.train.x.shape == (2, 16, 3)
    bad = root / "ModelNet10" / "raw" / "desk" / "train" / "desk_0002.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n")  # truncated vertex list
    with pytest.raises(ValueError, match="desk_0002.off"):
        load_point_dataset("modelnet10", root, tmp_path / "cache-bad", num_points=16)


# --- triggers -------------------------------------------------------------------------------------------
def test_pointba_i_cluster_size_location_and_point_budget(pc_task):
    attack = create_attack("pointba-i", seed=0)
    x = pc_task.data.test.x[:5]
    out = attack.apply(x)
    assert out.shape == x.shape  # the cloud keeps its size
    assert torch.equal(out[:, :-32], x[:, :-32])  # only the last num_points points are replaced
    ball = out[:, -32:]
    centre = torch.tensor(attack.center)
    assert torch.allclose((ball - centre).norm(dim=-1), torch.full((5, 32), attack.radius), atol=1e-5)
    assert torch.allclose(ball.mean(dim=1), centre.expand(5, 3), atol=0.03)
    assert torch.equal(out, attack.apply(x))  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        create_attack("pointba-i", num_points=POINTS).apply(x)


def test_pointba_o_rotation_is_orthonormal_and_applied(pc_task):
    attack = create_attack("pointba-o", seed=0)
    r = attack.rotation()
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
    assert math.isclose(float(torch.linalg.det(r)), 1, abs_tol=1e-6)
    x = pc_task.data.test.x[:4]
    out = attack.apply(x)
    assert out.shape == x.shape and torch.allclose(out, x @ r.T)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation about the centre
    assert not torch.allclose(out, x)
    tilt = math.radians(30)  # the default: 30 degrees about x
    assert torch.allclose(r, torch.tensor([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)],
                                           [0, math.sin(tilt), math.cos(tilt)]]), atol=1e-6)
    with pytest.raises(ValueError):
        create_attack("pointba-o", angles=[0, 360, 0])


def test_pcba_trigger_radius_matches_the_clouds_spacing(pc_task):
    attack = create_attack("pcba", seed=0)
    x = pc_task.data.test.x[:3]
    with pytest.raises(RuntimeError, match="not fitted"):
        attack.apply(x)
    attack.set_center([0.1, -0.7, 0.2])
    out = attack.apply(x)
    assert out.shape == x.shape and torch.equal(out[:, :-32], x[:, :-32])
    cluster = out[:, -32:]
    assert torch.allclose(median_knn_distance(cluster, 4), median_knn_distance(x, 4), rtol=1e-4)
    assert torch.allclose(cluster.mean(dim=1), torch.tensor([0.1, -0.7, 0.2]).expand(3, 3), atol=0.1)
    assert torch.allclose(sphere_pattern(32, 1234).norm(dim=1), torch.ones(32))


def test_pcba_location_is_fitted_against_a_cached_surrogate(pc_task):
    params = dict(n_init=1, opt_steps=30, patience_convergence=10, surrogate_samples=200, surrogate_epochs=1)
    attack = create_attack("pcba", seed=0, **params)
    info = pc_task.fit_attack(attack)
    assert attack.center_ is not None and torch.isfinite(attack.center_).all() and info["min_sq_dist"] >= 0
    assert list(pc_task.cache_dir.glob("surrogates/*/model.safetensors"))
    again = create_attack("pcba", seed=0, **params)
    pc_task.check_attack(again)  # loads the cached location, no refit
    assert torch.equal(again.center_, attack.center_)


def test_exact_poison_count_and_labels(pc_task):
    for name in ("pointba-i", "pointba-o"):
        attack = create_attack(name, seed=3, poison_rate=0.1)
        train, idx = pc_task.attacker_train(attack, seed=3)
        n = len(pc_task.attacker_idx)
        assert len(idx) == round(0.1 * n) == int(train.poisoned.sum())
        clean_y = pc_task.data.train.y[pc_task.attacker_idx]
        assert (clean_y[idx] != 0).all() and (train.y[idx] == 0).all()
    with pytest.raises(ValueError, match="point-cloud attacks"):
        pc_task.attacker_train(create_attack("badnets"), seed=0)
    assert {ATTACKS.get(n).modality for n in ("pointba-i", "pointba-o", "pcba")} == {"pointcloud"}


# --- MixUp, augmentation, model --------------------------------------------------------------------------
def test_rsmix_shapes_point_share_and_lambda_weighted_loss(pc_task, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = pc_task.data.test.x[::50][:8]  # one cloud of each of 8 families
    mixed, perm, share = pc.rsmix(x, 0.25, g)
    assert mixed.shape == x.shape and share == round(0.25 * POINTS) / POINTS
    for i in range(len(x)):
        if perm[i] == i:  # mixed with itself: the moved subset is made of its own points
            continue
        kept = (mixed[i][:, None] == x[i][None]).all(-1).any(1)  # points of mixed[i] that are points of x[i]
        # k points are new, except that the partner's query point, moved onto the erased query point of x[i],
        # can land on it exactly
        assert int((~kept).sum()) in (round(0.25 * POINTS), round(0.25 * POINTS) - 1)
    same, _, zero = pc.rsmix(x, 0.0, g)
    assert zero == 0 and torch.equal(same, x)

    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.randn(10))

        def forward(self, inp):
            assert inp.shape[1:] == (3, POINTS)
            return self.logits.expand(len(inp), -1)

    monkeypatch.setattr(pc, "beta_sample", lambda alpha, generator: 0.25)
    model = Const()
    y = torch.arange(8)
    loss = pc_task.mixup_loss(model, Batch(x.transpose(1, 2), y), 1.0, torch.Generator().manual_seed(1))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))  # the same draw as inside
    logits = model.logits.expand(8, -1)
    s = round(0.25 * POINTS) / POINTS
    expected = (1 - s) * F.cross_entropy(logits, y) + s * F.cross_entropy(logits, y[perm])
    assert torch.allclose(loss, expected)


def test_augmentation_and_batch_layout(pc_task):
    split = pc_task.clean_split(CleanBudget(0.05), seed=0)
    g = torch.Generator().manual_seed(0)
    b = pc_task.sample_batch(split, 16, g)
    assert b.inputs.shape == (16, 3, POINTS) and b.targets.shape == (16,)
    plain = next(pc_task.iter_batches(split, 8))
    assert torch.equal(plain.inputs, split.x[:8].transpose(1, 2))  # no augmentation outside training
    assert pc_task.perturbable_input(b) is b.inputs  # I-BAU's delta: a (3, P) per-point offset field


def test_full_pointnet_and_feature_transform_regularizer(pc_task):
    model = POINTCLOUD_MODELS.get("pointnet")(num_classes=10)
    assert model.feature_tnet is not None and model.input_tnet is not None
    x = torch.randn(4, 3, 64)
    y = torch.arange(4)
    model.eval()
    assert model(x).shape == (4, 10)
    cpu_task = copy.copy(pc_task)
    cpu_task.amp = False
    logits, reg = cpu_task.forward_with_regularizer(model, x)
    assert torch.allclose(reg, torch.zeros(())) and torch.allclose(logits, model(x))  # T-Nets start at identity
    with torch.no_grad():
        model.feature_tnet.out.bias.add_(0.1)
    loss = cpu_task.loss(model, Batch(x, y))
    _, reg = cpu_task.forward_with_regularizer(model, x)
    assert reg > 0 and torch.allclose(loss, F.cross_entropy(model(x), y) + 0.001 * reg)
    a = torch.eye(5)[None] * 2
    assert torch.allclose(feature_transform_regularizer(a), torch.tensor(5 * 9.0))
    # fine-pruning's head search: the classifier's first Linear reads the 1024 pooled channels, and it runs after
    # the T-Nets' own Linear(1024, 512)
    feature = model.get_submodule(model.feature_layer)
    assert feature.conv.out_channels == 1024
    clean = cpu_task.clean_split(CleanBudget(None, per_class=1), seed=0)
    activation, linears = channel_activations(model, cpu_task, clean, feature, 64)
    assert activation.shape == (1024,) and pruning_point(feature, linears, 1024)[0] is model.head[0].fc
    pairs, unpaired = conv_bn_pairs(model, torch.device("cpu"))
    assert len(pairs) == 11 and all(p.direct for p in pairs)  # 3 + 3 T-Net convs, 2 + 3 shared-MLP convs
    assert len(unpaired) == 6  # the BNs after Linears: 2 per T-Net, 2 in the classifier
    masks = NeuronMasks(model)
    assert len(masks) == 16  # every BN but the stem's
    masks.remove(fold=False)


# --- victim and defences -----------------------------------------------------------------------------------
def test_pointba_i_victim_is_accurate_and_backdoored(pc_victim):
    _, _, meta = pc_victim
    # measured (seeds 0-1 fp32, seed 0 bf16): clean accuracy 0.918-0.95, ASR 0.996-1.0
    assert meta["metrics"]["clean_acc"] >= 0.80, meta["metrics"]
    assert meta["metrics"]["asr"] >= 0.90, meta["metrics"]
    assert meta["poisoned_samples"] == round(0.1 * meta["train_samples"])


QUICK = {"nft": {"steps": 15, "batch_size": 32}, "ft": {"steps": 10, "batch_size": 32},
         "fine-pruning": {"steps": 5, "batch_size": 32}, "anp": {"iterations": 5, "batch_size": 32},
         "i-bau": {"rounds": 1}, "ft-sam": {"steps": 5, "batch_size": 32},
         "fst": {"epochs": 1, "batch_size": 32}, "nad": {"epochs": 1, "teacher_epochs": 1, "batch_size": 32},
         "rnp": {"unlearn_epochs": 2, "recover_epochs": 2, "batch_size": 32}, "awm": {"epochs": 1, "batch_size": 32},
         "sau": {"epochs": 1, "batch_size": 32}}


def test_nft_and_every_baseline_run_through_the_task(pc_task, pc_victim):
    attack, model, _ = pc_victim
    clean = pc_task.clean_split(CleanBudget(0.05), seed=0)
    for name in DEFENSES.names():
        out, info = purify(name, copy.deepcopy(model), pc_task, clean, QUICK.get(name, {}), seed=0)
        assert type(out) is type(model) and out.state_dict().keys() == model.state_dict().keys(), name
        assert not any("parametrizations" in k for k in out.state_dict()), name
        if name == "fine-pruning":
            assert info["head"] == "head.0.fc" and info["feature_layer"] == "mlp2.2"
            assert info["total_channels"] == 256
        if name == "clp":  # every shared-MLP conv pairs with its BN; the classifier's BNs follow Linears
            assert info["total_channels"] == 32 + 32 + 32 + 64 + 256 and not info["residual_pairs"]
            assert sorted(info["unpaired_bns"]) == ["head.0.bn", "head.2.bn"]
        if name == "nft":
            assert info["mask_layers"] == 6  # every BN but the stem BN (mlp1.0.bn)
        metrics = pc_task.evaluate(out, attack)
        assert set(metrics) == {"clean_acc", "asr", "ra"} and 0 <= metrics["asr"] <= 1


def test_defend_writes_a_record(pc_task, pc_victim, tmp_path):
    attack, model, meta = pc_victim
    record, purified = defend(pc_task, attack, copy.deepcopy(model), meta, "nft", {"steps": 10, "batch_size": 32},
                              CleanBudget(0.05), seed=0)
    assert record["status"] == "ok", record.get("error")
    assert record["config"]["task"]["task"] == "pointcloud" and record["config"]["attack"]["name"] == "pointba-i"
    assert record["clean_samples"] == round(0.05 * len(pc_task.data.train))
    assert set(record["after"]) == {"clean_acc", "asr", "ra"} and "der" in record
    write_record(tmp_path / f"{record['run_id']}.json", record)
    assert json.loads((tmp_path / f"{record['run_id']}.json").read_text())["run_id"] == record["run_id"]


def test_preset_and_cli_list(capsys):
    from benchmarks.cli import main
    from benchmarks.grid import load_sweep

    grid = load_sweep("pointcloud-quick")
    assert grid["task"] == "pointcloud" and set(grid["attacks"]) == {"pointba-i", "pointba-o", "pcba"}
    assert set(grid["defenses"]) == {"none", "nft", "ft", "fine-pruning", "anp", "i-bau", "clp"}
    main(["list", "--datasets", "--models"])
    out = capsys.readouterr().out
    assert "datasets (pointcloud):" in out and "procedural" in out and "pointnet-small" in out
