"""The video task: procedural clips, the PyAV decoder and the UCF101 / HMDB51 layouts, static / dynamic BadNets and
Blend over frames, clip MixUp and VideoMix, the models, NFT and every baseline through the protocol; and the
extension point itself: a task defined only in this file runs every defence."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tasks.video as tv
from attacks import ATTACKS, create_attack
from defenses import DEFENSES, purify
from defenses.clp import conv_bn_pairs
from defenses.masking import NeuronMasks
from tasks import TASKS, Batch, CleanBudget, Task, create_task
from tasks.base import LabelledTensors, TensorBatches, beta_sample, select_clean, stratified_split
from tasks.data_cache import list_caches
from tasks.video_data import (
    PROCEDURAL_CLASSES,
    DatasetNotFoundError,
    decode_clip,
    load_video_dataset,
    procedural_clips,
)
from training.victims import get_victim

FRAMES, SIZE = 8, 16


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("video-runs")


@pytest.fixture(scope="module")
def video_task(video_runs):
    task = create_task("video", device="cpu", cache_dir=video_runs)
    recipe = {**task.recipe(), "epochs": 4}
    task.recipe = lambda: recipe  # a shorter victim recipe for the test (it is part of the victim's hash)
    return task


@pytest.fixture(scope="module")
def video_victim(video_task, video_runs):
    attack = create_attack("badnets-video", seed=0)
    model, meta, _ = get_victim(video_task, attack, 0, video_runs)
    return attack, model, meta


# --- data ------------------------------------------------------------------------------------------------------
def test_procedural_clips_are_defined_by_motion(video_task):
    train, test = video_task.data.train, video_task.data.test
    k = len(PROCEDURAL_CLASSES)
    assert train.x.shape == (100 * k, 3, FRAMES, SIZE, SIZE) and train.x.dtype == torch.uint8
    assert test.x.shape == (30 * k, 3, FRAMES, SIZE, SIZE)
    assert torch.bincount(train.y).tolist() == [100] * k and not video_task.data.flip  # left/right are classes
    a, ya = procedural_clips(2, FRAMES, SIZE, seed=5)
    b, yb = procedural_clips(2, FRAMES, SIZE, seed=5)
    assert (a == b).all() and (ya == yb).all() and not (a == procedural_clips(2, FRAMES, SIZE, seed=6)[0]).all()
    x = train.x.float() / 255
    bright = x.mean(1) > 0.5  # object pixels (N, T, H, W); the background is <= 0.3 + noise
    area = bright.flatten(2).sum(-1).float()  # (N, T)
    motion = (bright[:, 1:] ^ bright[:, :-1]).flatten(1).sum(-1).float()
    static, right = PROCEDURAL_CLASSES.index("static"), PROCEDURAL_CLASSES.index("right")
    appear = PROCEDURAL_CLASSES.index("appear")
    assert motion[train.y == static].max() == 0 and motion[train.y == right].min() > 0
    assert (area[train.y == appear][:, : FRAMES // 2] == 0).all() and (area[train.y == appear][:, -1] > 0).all()
    # the object's horizontal centre moves one pixel per frame to the right (wrapping at the edge)
    clip = bright[train.y == right][0]
    cols = [torch.nonzero(clip[t].any(0)).flatten() for t in range(FRAMES)]
    assert all(set(((c + 1) % SIZE).tolist()) == set(d.tolist()) for c, d in zip(cols, cols[1:], strict=False))
    again = load_video_dataset("procedural", "unused", video_task.cache_dir, FRAMES, SIZE)
    assert again.fingerprint == video_task.data.fingerprint and torch.equal(again.train.x, train.x)


def write_video(path, frames: int, colour: int, fps: int = 30) -> None:
    av = pytest.importorskip("av")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 40, 30, "yuv420p"
        for t in range(frames):
            img = np.full((30, 40, 3), colour, dtype=np.uint8)
            img[:, (t * 2) % 40] = 255  # a moving white column
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def test_ucf101_layout_decoder_and_content_keyed_cache(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "data" / "UCF101"
    for c, colour in (("ApplyLipstick", 40), ("Archery", 160)):
        for g in (1, 2):
            write_video(root / "UCF-101" / c / f"v_{c}_g0{g}_c01.avi", 20, colour)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyLipstick\n2 Archery\n")
    (lists / "trainlist01.txt").write_text("ApplyLipstick/v_ApplyLipstick_g02_c01.avi 1\n"
                                           "Archery/v_Archery_g02_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("ApplyLipstick/v_ApplyLipstick_g01_c01.avi\nArchery/v_Archery_g01_c01.avi\n")
    cache = tmp_path / "cache"
    data = load_video_dataset("ucf101", tmp_path / "data", cache, frames=4, size=16)
    assert data.classes == ["ApplyLipstick", "Archery"] and data.flip
    assert data.train.x.shape == (2, 3, 4, 16, 16) and data.train.y.tolist() == data.test.y.tolist() == [0, 1]
    medians = [float(data.train.x[i].float().median()) for i in range(2)]  # the background survives the codec
    assert abs(medians[0] - 40) < 8 and abs(medians[1] - 160) < 8
    assert len(list((cache / "video-clips").glob("*-16px.npy"))) == 4
    assert [e.state[:2] for e in list_caches(cache)] == ["ok", "ok"]  # the split and the per-video clips
    task = create_task("video", dataset="ucf101", data_root=tmp_path / "data", cache_dir=cache, device="cpu",
                       size=12, frames=4)
    assert task.data.train.x.shape[-1] == round(12 * 64 / 56)  # cached 8/7 larger, cropped to the model's side
    assert next(task.iter_batches(task.test, 2)).inputs.shape == (2, 3, 4, 12, 12)
    write_video(root / "UCF-101" / "Archery" / "v_Archery_g02_c01.avi", 20, 90)  # changed content: decoded again
    changed = load_video_dataset("ucf101", tmp_path / "data", cache, frames=4, size=16)
    assert changed.fingerprint != data.fingerprint and len(list((cache / "video-clips").glob("*-16px.npy"))) == 5
    assert torch.equal(changed.test.x, data.test.x)  # the unchanged videos come from their cached clips
    (root / "UCF-101" / "Archery" / "v_Archery_g01_c01.avi").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing"):
        load_video_dataset("ucf101", tmp_path / "data", cache, frames=4, size=16)


def test_procedural_cache_is_keyed_listed_and_rebuilt_when_damaged(tmp_path, capsys):
    data = load_video_dataset("procedural", tmp_path / "data", tmp_path, frames=4, size=8)
    (entry,) = list_caches(tmp_path)
    assert entry.state == "ok" and entry.path.name.startswith("video-procedural-s1-t4-8px-")
    with open(entry.path / "train_x.npy", "r+b") as f:  # truncated, as a full disk or a killed copy leaves it
        f.truncate(200)
    again = load_video_dataset("procedural", tmp_path / "data", tmp_path, frames=4, size=8)
    assert torch.equal(again.train.x, data.train.x) and again.fingerprint == data.fingerprint
    assert f"dataset cache {entry.path} is unreadable" in capsys.readouterr().err


def test_hmdb51_layout_and_missing_dataset(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "data" / "HMDB51"
    for c in ("brush_hair", "cartwheel"):
        for i in range(3):
            write_video(root / "hmdb51" / c / f"{c}_{i}.avi", 6, 100)
        split = root / "testTrainMulti_7030_splits" / f"{c}_test_split1.txt"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text(f"{c}_0.avi 1 \n{c}_1.avi 2 \n{c}_2.avi 0 \n")
    data = load_video_dataset("hmdb51", tmp_path / "data", tmp_path / "cache", frames=8, size=8)
    assert data.classes == ["brush_hair", "cartwheel"] and data.train.y.tolist() == [0, 1]
    assert data.test.x.shape == (2, 3, 8, 8, 8)  # 6 frames: the clip repeats the last one
    with pytest.raises(DatasetNotFoundError, match="UCF101 not found"):
        load_video_dataset("ucf101", tmp_path / "data", tmp_path / "cache", frames=8, size=8)
    broken = root / "hmdb51" / "cartwheel" / "cartwheel_0.avi"
    broken.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cartwheel_0.avi"):
        decode_clip(broken, 8, 8)


# --- triggers --------------------------------------------------------------------------------------------------
def test_static_dynamic_and_blend_triggers(video_task):
    x = video_task.data.test.x[:3].float() / 255
    static = create_attack("badnets-video").apply(x)
    assert torch.equal(static[..., :-3, :], x[..., :-3, :]) and torch.equal(static[..., :-3], x[..., :-3])
    patch = static[..., -3:, -3:]
    assert (patch == patch[:, :, :1]).all() and set(patch.unique().tolist()) == {0.0, 1.0}  # same on every frame
    dynamic = create_attack("badnets-video-dynamic")
    assert dynamic.corners(FRAMES, SIZE, SIZE)[0] == (0, 0) and dynamic.corners(FRAMES, SIZE, SIZE)[-1] == (13, 13)
    out = dynamic.apply(x)
    for t, (r, c) in enumerate(dynamic.corners(FRAMES, SIZE, SIZE)):
        changed = (out[:, :, t] != x[:, :, t]).any(0).any(0)
        assert changed[r:r + 3, c:c + 3].any() and not changed.clone().index_fill_(0, torch.arange(r, r + 3), False
                                                                                   )[:, c:c + 3].any()
    blend = create_attack("blend-video").apply(x)
    delta = blend - 0.8 * x
    assert torch.allclose(delta, delta[:, :, :1].expand_as(delta), atol=1e-6)  # the same pattern on every frame
    assert torch.allclose(delta[0], delta[1], atol=1e-6)  # and on every clip
    assert {ATTACKS.get(n).modality for n in ("badnets-video", "badnets-video-dynamic", "blend-video")} == {"video"}
    with pytest.raises(ValueError, match="end must be"):
        create_attack("badnets-video-dynamic", end="middle")


def test_exact_poison_counts_and_the_trigger_on_the_cropped_clip(video_task):
    for name in ("badnets-video", "badnets-video-dynamic", "blend-video"):
        attack = create_attack(name, seed=2, poison_rate=0.1)
        train, idx = video_task.attacker_train(attack, seed=2)
        assert len(idx) == round(0.1 * len(video_task.attacker_idx)) == int(train.poisoned.sum())
        clean_y = video_task.data.train.y[video_task.attacker_idx]
        assert (clean_y[idx] != 0).all() and (train.y[idx] == 0).all()
    attack = create_attack("badnets-video", seed=2)
    train, idx = video_task.attacker_train(attack, seed=2)
    b = video_task.sample_batch(train.subset(idx[:8]), 8, torch.Generator().manual_seed(0))  # augmented
    assert b.inputs.shape == (8, 3, FRAMES, SIZE, SIZE) and torch.equal(b.inputs, attack.apply(b.inputs))
    with pytest.raises(ValueError, match="video attacks"):
        video_task.attacker_train(create_attack("badnets"), seed=0)


# --- MixUp, models ---------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Constant logits; keeps the input it saw."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(classes))

    def forward(self, x):
        self.seen = x
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("videomix", ["spatial", "spatiotemporal"])
def test_clip_mixup_and_videomix_weight_labels_by_share(video_task, monkeypatch, videomix):
    monkeypatch.setattr(tv, "beta_sample", lambda alpha, generator: 0.3)
    task = copy.copy(video_task)
    task.videomix, task.amp = videomix, False
    x = torch.rand(6, 3, FRAMES, SIZE, SIZE)
    y = torch.arange(6)
    model = Recorder()
    logits = model.logits.expand(6, -1)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    loss = task.mixup_loss(model, Batch(x, y), 1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(model.seen, 0.3 * x + 0.7 * x[perm])
    assert torch.allclose(loss, 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y[perm]))
    loss = task.cutmix_loss(model, Batch(x, y), 1.0, torch.Generator().manual_seed(1))
    pasted = (model.seen != x).any(0).any(0)  # (T, H, W) voxels taken from the partner
    frames_used = pasted.flatten(1).any(1)
    assert frames_used.all() if videomix == "spatial" else 0 < frames_used.sum() < FRAMES
    lam = 1 - pasted.float().mean()
    assert 0 < lam < 1 and torch.allclose(loss, lam * F.cross_entropy(logits, y) + (1 - lam) *
                                          F.cross_entropy(logits, y[perm]), atol=1e-6)
    with pytest.raises(ValueError, match="videomix"):
        create_task("video", device="cpu", cache_dir=video_task.cache_dir, videomix="temporal")


@pytest.mark.parametrize("arch", ["r3d_18", "r2plus1d_18"])
def test_torchvision_video_resnets_have_3d_batchnorm_masks(arch, tmp_path):
    torch.manual_seed(0)
    model = tv.VideoClassifier(tv.VIDEO_MODELS.get(arch)(num_classes=5), (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(2, 3, 4, 16, 16)
    assert model(x).shape == (2, 5)
    assert model.feature_layer == "net.model.layer4" and model.get_submodule(model.feature_layer)
    masks = NeuronMasks(model)  # every BatchNorm3d but the stem's
    stem = [n for n in model.mask_exclude]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(masks) == len(bns) - len(stem) and stem and all(s in bns for s in stem)
    masks.remove(fold=False)
    pairs, unpaired = conv_bn_pairs(model, torch.device("cpu"), probe_size=8)
    assert len(pairs) == len(bns) and not unpaired
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.model.state_dict().items()}, str(weights))
    again = tv.VIDEO_MODELS.get(arch)(num_classes=5, pretrained=str(weights)).eval()
    assert torch.equal(again.model.fc.weight, model.net.model.fc.weight)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        tv.VIDEO_MODELS.get(arch)(num_classes=5, pretrained=str(tmp_path / "w.pth"))


# --- victim and defences -----------------------------------------------------------------------------------------
def test_badnets_video_victim_is_accurate_and_backdoored(video_victim):
    _, _, meta = video_victim
    assert meta["metrics"]["clean_acc"] >= 0.8 and meta["metrics"]["asr"] >= 0.9, meta["metrics"]
    assert meta["poisoned_samples"] == round(0.1 * meta["train_samples"])


QUICK = {"nft": {"steps": 10, "batch_size": 16}, "ft": {"steps": 5, "batch_size": 16},
         "fine-pruning": {"steps": 3, "batch_size": 16}, "anp": {"iterations": 3, "batch_size": 16},
         "i-bau": {"rounds": 1, "batch_size": 25}, "ft-sam": {"steps": 3, "batch_size": 16},
         "fst": {"epochs": 1, "batch_size": 16}, "nad": {"epochs": 1, "teacher_epochs": 1, "batch_size": 16},
         "rnp": {"unlearn_epochs": 1, "recover_epochs": 1, "batch_size": 16}, "awm": {"epochs": 1, "batch_size": 16},
         "sau": {"epochs": 1, "batch_size": 16}}


def test_nft_and_every_baseline_run_through_the_video_task(video_task, video_victim):
    attack, model, _ = video_victim
    clean = video_task.clean_split(CleanBudget(0.05), seed=0)
    for name in DEFENSES.names():
        out, info = purify(name, copy.deepcopy(model), video_task, clean, QUICK.get(name, {}), seed=0)
        assert type(out) is type(model) and out.state_dict().keys() == model.state_dict().keys(), name
        if name == "fine-pruning":
            assert info["feature_layer"] == "net.layer3" and info["total_channels"] == 128
        if name == "nft":
            assert info["mask_layers"] == 3  # every BatchNorm3d but the stem's
        metrics = video_task.evaluate(out, attack)
        assert set(metrics) == {"clean_acc", "asr", "ra"} and 0 <= metrics["asr"] <= 1
    _, info = purify("nft", copy.deepcopy(model), video_task, clean, {**QUICK["nft"], "mix": "cutmix"}, seed=0)
    assert info["defense"] == "nft"  # NFT with VideoMix, the task's CutMix


def test_preset_and_registration():
    from benchmarks.grid import load_sweep

    assert "video" in TASKS and TASKS.get("video").default_attack == "badnets-video"
    grid = load_sweep("video-quick")
    assert grid["task"] == "video" and set(grid["attacks"]) == {"badnets-video", "badnets-video-dynamic", "blend-video"}
    assert set(grid["defenses"]) == {"none", "nft", "ft", "fine-pruning", "anp", "i-bau"} and grid["seeds"] == [0, 1]
    assert load_sweep("video-ucf101")["datasets"] == ["ucf101"]


# --- the extension point: a task defined outside the suite --------------------------------------------------------
class TabularTask(TensorBatches, Task):
    """A minimal outside task: 4 Gaussian blobs in 16 dimensions, an MLP with BatchNorm1d; no attack modality."""

    name, default_dataset, default_attack = "test-tabular", "blobs", "none"

    def __init__(self, device: str = "cpu", **_):
        g = torch.Generator().manual_seed(0)
        self.num_classes, self.device = 4, torch.device(device)
        centres = torch.randn(4, 16, generator=g) * 3
        y = torch.arange(4).repeat_interleave(150)
        x = centres[y] + torch.randn(len(y), 16, generator=g)
        self.train = LabelledTensors(x[::2], y[::2])
        self.test = LabelledTensors(x[1::2], y[1::2])
        self.attacker_idx, self.reserve_idx = stratified_split(self.train.y, 0.2, 0)

    def build_model(self):
        return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                             nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).to(self.device)

    def split_sizes(self, split):
        return len(split)

    def config(self):
        return {"task": self.name}

    def recipe(self):
        return dict(epochs=5, batch_size=32, lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0,
                    schedule="cosine", label_smoothing=0.0)

    def check_attack(self, attack):
        if attack is not None:
            raise ValueError("the tabular test task takes no attack")

    def attacker_train(self, attack, seed):
        self.check_attack(attack)
        return self.train.subset(self.attacker_idx), torch.empty(0, dtype=torch.long)

    def clean_split(self, budget, seed):
        return self.train.subset(select_clean(self.train.y, self.reserve_idx, self.num_classes, budget, seed))

    def make_batch(self, split, idx, augment, generator):
        return Batch(split.x[idx], split.y[idx])

    def loss(self, model, batch, label_smoothing=0.0):
        return F.cross_entropy(model(batch.inputs), batch.targets, label_smoothing=label_smoothing)

    def mixup_loss(self, model, batch, alpha, generator):
        lam = beta_sample(alpha, generator)
        perm = torch.randperm(len(batch), generator=generator)
        logits = model(lam * batch.inputs + (1 - lam) * batch.inputs[perm])
        return lam * F.cross_entropy(logits, batch.targets) + (1 - lam) * F.cross_entropy(logits, batch.targets[perm])

    @torch.no_grad()
    def accuracy(self, model, split):
        was = model.training
        model.eval()
        acc = float((model(split.x).argmax(1) == split.y).float().mean())
        model.train(was)
        return acc

    def perturbable_input(self, batch):
        return batch.inputs

    def with_input(self, batch, inputs):
        return dataclasses.replace(batch, inputs=inputs)

    def feature_layer(self, model):
        return model[4]  # the last hidden BatchNorm1d: its 32 channels reach the classifier

    def evaluate(self, model, attack):
        return {"clean_acc": self.accuracy(model, self.test), "asr": None, "ra": None}


# NAD distils spatial attention maps, which a vector feature has not; CLP bounds convolution kernels; AWM masks
# convolutions unless told to mask Linears too (then it runs, below)
NOT_FOR_VECTORS = {"nad": "feature maps", "clp": "CLP needs conv", "awm": "no convolution"}


def test_a_task_defined_outside_the_suite_runs_every_defence(tmp_path):
    """The extension point: register a task from a test file, train a model with the suite's trainer, and run
    every defence on it through the protocol alone, without test data; a defence that cannot run says why."""
    TASKS.register("test-tabular")(TabularTask)
    try:
        task = create_task("test-tabular")
        model, meta, _ = get_victim(task, None, 0, tmp_path)
        assert meta["metrics"]["clean_acc"] > 0.9
        clean = task.clean_split(CleanBudget(None, per_class=10), seed=0)
        quick = {**QUICK, "i-bau": {"rounds": 1, "batch_size": 20}, "awm-linear": {**QUICK["awm"], "mask_linear": True}}
        for name in DEFENSES.names():
            if name in NOT_FOR_VECTORS:
                with pytest.raises(ValueError, match=NOT_FOR_VECTORS[name]):
                    purify(name, copy.deepcopy(model), task, clean, quick.get(name, {}), seed=0)
                continue
            out, info = purify(name, copy.deepcopy(model), task, clean, quick.get(name, {}), seed=0)
            assert type(out) is type(model) and out.state_dict().keys() == model.state_dict().keys(), name
            assert 0 <= task.evaluate(out, None)["clean_acc"] <= 1, name
        purify("awm", copy.deepcopy(model), task, clean, quick["awm-linear"], seed=0)
    finally:
        TASKS._items.pop("test-tabular")
