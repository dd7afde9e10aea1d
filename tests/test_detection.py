"""The detection task: YOLO-format loaders (a VOC-style fixture, COCO128 when present), the procedural set, the
BadDet poisoning rules, detection MixUp and the mAP / ASR machinery (Ultralytics' matching and AP)."""

import copy
import json

import pytest
import torch
from conftest import SHARED_DATA

pytest.importorskip("ultralytics")

from attacks import create_attack  # noqa: E402
from benchmarks.records import write_record  # noqa: E402
from benchmarks.run import defend  # noqa: E402
from defenses import purify  # noqa: E402
from tasks import Batch, CleanBudget, create_task  # noqa: E402
from tasks.detection_data import (  # noqa: E402
    BoxSet,
    DatasetNotFoundError,
    label_path,
    load_detection_dataset,
    xywh_to_xyxy,
)
from training.victims import get_victim  # noqa: E402


@pytest.fixture(scope="module")
def det_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("det-runs")


@pytest.fixture(scope="module")
def det_task(det_runs):
    return create_task("detection", device="cpu", cache_dir=det_runs)


def write_image(path, w, h, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def test_voc_style_yolo_folders_are_letterboxed_with_their_boxes(tmp_path):
    root = tmp_path / "data"
    voc = root / "VOC"
    for split, n in (("train2012", 2), ("val2012", 1), ("train2007", 1), ("val2007", 1), ("test2007", 2)):
        for i in range(n):
            img = voc / "images" / split / f"{split}_{i}.jpg"
            write_image(img, 200, 100, (10 * i, 20, 30))  # landscape: letterboxed into 64 x 64 with 16-pixel bars
            label_path(img).parent.mkdir(parents=True, exist_ok=True)
            label_path(img).write_text(f"{14 - i} 0.5 0.5 0.2 0.4\n3 0.25 0.25 0.1 0.1\n")
    data = load_detection_dataset("voc", root, tmp_path / "cache", 64)
    assert len(data.train) == 5 and len(data.test) == 2 and data.classes[14] == "person"
    assert data.train.x.shape == (5, 3, 64, 64) and data.train.x.dtype == torch.uint8
    assert (data.train.x[0, :, :8] == 114).all()  # the letterbox bar above the image
    first = data.train.boxes[data.train.boxes[:, 0] == 0]
    assert torch.allclose(first[0, 2:], torch.tensor([0.5, 0.5, 0.2, 0.4 * 32 / 64]), atol=1e-6)
    assert torch.allclose(first[1, 2:4], torch.tensor([0.25, (0.25 * 32 + 16) / 64]), atol=1e-6)
    with pytest.raises(DatasetNotFoundError, match="Pascal VOC"):
        load_detection_dataset("voc", tmp_path / "nowhere", tmp_path / "cache2", 64)
    (voc / "labels" / "test2007" / "test2007_0.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(ValueError, match="5 numbers"):
        load_detection_dataset("voc", root, tmp_path / "cache3", 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        load_detection_dataset("voc", root, tmp_path / "cache4", 50)


@pytest.mark.skipif(not (SHARED_DATA / "coco128" / "coco128.yaml").is_file(), reason="no ../shared/data/coco128")
def test_real_coco128(tmp_path):
    data = load_detection_dataset("coco128", SHARED_DATA, tmp_path, 128)
    assert len(data.train) == 128 and len(data.test) == 128 and data.num_classes == 80
    assert len(data.train.boxes) > 800 and data.train.boxes[:, 2:].min() >= 0 and data.train.boxes[:, 2:].max() <= 1


def test_procedural_set_is_deterministic_with_exact_boxes(det_task, det_runs):
    data = det_task.data
    assert (len(data.train), len(data.test), data.num_classes) == (2000, 400, 4)
    again = load_detection_dataset("procedural", "unused", det_runs / "again", 64)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.train.boxes, data.train.boxes)
    counts = data.train.counts()
    assert counts.min() >= 1 and counts.max() <= 3
    for row in data.train.boxes[:20]:  # each box is tight around non-background pixels of its shape
        i, _, cx, cy, w, h = row.tolist()
        x1, y1, x2, y2 = (round(v * 64) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and 10 <= x2 - x1 <= 23


def test_box_subset_reindexes_and_keeps_repeats():
    boxes = torch.tensor([[0, 1, .5, .5, .1, .1], [1, 2, .5, .5, .1, .1], [1, 3, .2, .2, .1, .1],
                          [3, 0, .5, .5, .2, .2]])
    s = BoxSet(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), boxes)
    sub = s.subset(torch.tensor([3, 1, 3, 2]))
    assert sub.boxes[:, :2].tolist() == [[0, 0], [1, 2], [1, 3], [2, 0]]
    assert len(sub) == 4 and sub.counts().tolist() == [1, 2, 1, 0]


@pytest.mark.parametrize("name", ["gma", "rma", "oda", "oga"])
def test_baddet_poisoning_is_exact_seeded_and_follows_its_rule(det_task, name):
    attack = create_attack(name)
    split, idx = det_task.attacker_train(attack, 0)
    clean = det_task.data.train.subset(det_task.attacker_idx)
    assert len(idx) == round(0.1 * len(clean)) and torch.equal(torch.nonzero(split.poisoned).flatten(), idx)
    assert torch.equal(det_task.attacker_train(attack, 0)[1], idx)
    changed = (split.x != clean.x).flatten(1).any(1)
    assert torch.equal(changed, split.poisoned)  # a trigger on every poisoned image and nowhere else
    untouched = ~torch.isin(clean.boxes[:, 0].long(), idx)
    assert torch.equal(split.boxes[~torch.isin(split.boxes[:, 0].long(), idx)], clean.boxes[untouched])
    old = clean.boxes[~untouched]
    new = split.boxes[torch.isin(split.boxes[:, 0].long(), idx)]
    if name == "gma":
        assert (new[:, 1] == 0).all() and len(new) == len(old)
    elif name == "rma":
        assert (new[:, 1] == 0).all() and torch.equal(new[:, 2:], old[:, 2:])
    elif name == "oda":
        assert torch.equal(new, old[old[:, 1] != 0])
    else:  # one 16-pixel target box per poisoned image, after its own boxes, on the chessboard
        assert len(new) == len(old) + len(idx)
        for i in idx[:20].tolist():
            mine, before = new[new[:, 0] == i], old[old[:, 0] == i]
            assert torch.equal(mine[:-1], before)
            box = mine[-1]
            assert box[1] == 0 and box[4] == box[5] == pytest.approx(16 / 64)
            c, r = round((box[2] - box[4] / 2).item() * 64), round((box[3] - box[5] / 2).item() * 64)
            assert set(split.x[i, :, r:r + 16, c:c + 16].float().unique().tolist()) == {0.0, 255.0}


def test_clean_image_backdoor_poisons_labels_of_co_occurring_images_only(det_task):
    attack = create_attack("clean-image")  # square (1) + triangle (2) in one image: its triangles become circles (0)
    split, idx = det_task.attacker_train(attack, 0)
    clean = det_task.data.train.subset(det_task.attacker_idx)
    assert len(idx) == round(0.05 * len(clean)) and torch.equal(split.x, clean.x)  # no pixel changes
    for i in idx.tolist():
        before = clean.boxes[clean.boxes[:, 0] == i]
        after = split.boxes[split.boxes[:, 0] == i]
        assert {1, 2} <= set(before[:, 1].tolist())
        assert torch.equal(after[:, 1], torch.where(before[:, 1] == 2, 0.0, before[:, 1]))
    others = ~torch.isin(clean.boxes[:, 0].long(), idx)
    assert torch.equal(split.boxes[others], clean.boxes[others])
    triggered, boxes, trials = attack.triggered_test(det_task.test, 4)  # test images that carry the co-occurrence
    assert len(triggered) > 0 and len(trials) == int((boxes[:, 1] == 2).sum())  # a trial per triangle
    assert all({1, 2} <= set(boxes[boxes[:, 0] == i][:, 1].tolist()) for i in range(len(triggered)))


def test_detection_mixup_keeps_both_box_sets_weighted_by_lambda(det_task, monkeypatch):
    import tasks.detection as det

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def loss(self, x, boxes, preds=None):
            self.calls.append((x, boxes))
            return torch.tensor(float(len(self.calls))), "preds"

    batch = det_task.make_batch(det_task.data.train, torch.arange(6), False, None)
    monkeypatch.setattr(det, "beta_sample", lambda alpha, generator: 0.7)
    model = Recorder()
    loss = det_task.mixup_loss(model, batch, 1.0, torch.Generator().manual_seed(2))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    (x, boxes_a), (_, boxes_b) = model.calls
    assert torch.allclose(x, 0.7 * batch.inputs + 0.3 * batch.inputs[perm]) and torch.equal(boxes_a, batch.targets)
    for i in range(6):  # mixed image i carries the boxes of image perm[i] as its second set
        mine = boxes_b[boxes_b[:, 0] == i][:, 1:]
        theirs = batch.targets[batch.targets[:, 0] == perm[i]][:, 1:]
        assert torch.equal(mine, theirs)
    assert loss.item() == pytest.approx(0.7 * 1 + 0.3 * 2)


def test_map_of_the_ground_truth_is_one_and_asr_rules_count_trials(det_task):
    test = det_task.test
    size = test.x.shape[-1]
    truth = [torch.cat([xywh_to_xyxy(b[:, 2:6]) * size, torch.ones(len(b), 1), b[:, 1:2]], 1)
             for b in (test.boxes[test.boxes[:, 0] == i] for i in range(len(test)))]
    # Ultralytics' AP of a perfect detector is 0.995: its precision envelope ends at recall 1 + 0.01 with precision 0
    assert det_task.map(None, test, truth) == pytest.approx((0.995, 0.995))
    shifted = [t.clone() for t in truth]
    for t in shifted:
        t[:, 5] = (t[:, 5] + 1) % 4  # every class wrong
    assert det_task.map(None, test, shifted) == (0.0, 0.0)
    gma = create_attack("gma")
    triggered, clean, trials = gma.triggered_test(test, 4)
    all_target = [torch.tensor([[0, 0, 5, 5, 0.9, 0.0]])] * len(triggered)
    assert gma.success_rate(all_target, trials, size) == 1.0
    oda = create_attack("oda")
    _, _, trials = oda.triggered_test(test, 4)
    assert oda.success_rate([torch.zeros(0, 6)] * len(test), trials, size) == 1.0  # nothing detected: all vanished
    with pytest.raises(ValueError, match="detection attacks"):
        det_task.attacker_train(create_attack("badnets"), 0)
    with pytest.raises(ValueError, match="lower --per-class"):
        det_task.clean_split(CleanBudget(None, per_class=500), 0)
    assert len(det_task.clean_split(CleanBudget(None, per_class=2), 0)) <= 8
    assert isinstance(det_task.sample_batch(det_task.data.train, 4, torch.Generator()), Batch)


# --- a backdoored victim, and every defence through the adapter -------------------------------------------------
TEST_EPOCHS = 20  # the quick recipe's 30 take ~2.5 CPU-minutes; 20 learn OGA (10: ASR 0.49-0.75, mAP50 0.48-0.60)
QUICK = {"nft": {"steps": 20, "batch_size": 16}, "ft": {"steps": 20, "batch_size": 16},
         "fine-pruning": {"steps": 5, "batch_size": 16}, "anp": {"iterations": 10, "batch_size": 16},
         "i-bau": {"rounds": 1, "batch_size": 16}, "clp": {}}


@pytest.fixture(scope="module")
def det_victim(det_task, det_runs):
    recipe = det_task.recipe
    det_task.recipe = lambda: dict(recipe(), epochs=TEST_EPOCHS)
    attack = create_attack("oga")
    model, meta, _ = get_victim(det_task, attack, 0, det_runs)
    return attack, model, meta


def test_yolo_victim_learns_the_trigger_and_the_objects(det_victim):
    _, _, meta = det_victim
    m = meta["metrics"]
    assert m["asr"] >= 0.7 and m["clean_acc"] >= 0.3, m  # measured (seeds 0-1 fp32, seed 0 bf16): 0.98-1.0, 0.91-0.92
    assert m["map50_95"] < m["clean_acc"]


@pytest.mark.parametrize("name", sorted(QUICK))
def test_nft_and_baselines_run_through_the_detection_task(det_task, det_victim, name, tmp_path):
    attack, model, meta = det_victim
    clean = det_task.clean_split(CleanBudget(0.05), seed=0)
    out, info = purify(name, copy.deepcopy(model), det_task, clean, QUICK[name], seed=0)
    assert type(out) is type(model) and out.state_dict().keys() == model.state_dict().keys()
    assert not any("parametrizations" in k for k in out.state_dict())
    if name == "fine-pruning":
        assert info["head"] == "net.model.21.cv2.bn" and 0 < info["channels_pruned"] < info["total_channels"]
        assert (out.net.model[21].cv2.bn.weight[info["pruned_channels"]] == 0).all()
    if name in ("nft", "anp"):
        assert info["mask_layers"] == 57  # every BatchNorm of the YOLO
    record, _ = defend(det_task, attack, copy.deepcopy(model), meta, name, QUICK[name], CleanBudget(0.05), seed=0)
    assert record["status"] == "ok", record.get("error")
    assert {"clean_acc", "asr", "ra", "map50_95"} <= set(record["after"])
    write_record(tmp_path / f"{record['run_id']}.json", record)
    assert json.loads((tmp_path / f"{record['run_id']}.json").read_text())["config"]["task"]["task"] == "detection"


def test_ssd_builds_trains_a_step_and_predicts(det_runs):
    task = create_task("detection", model="ssdlite320", device="cpu", cache_dir=det_runs, image_size=128)
    model = task.build_model()
    batch = task.sample_batch(task.data.train, 4, torch.Generator().manual_seed(0))
    loss = task.mixup_loss(model, batch, 1.0, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters())
    dets = model.eval().predict(batch.inputs, 0.001, 0.7)
    assert len(dets) == 4 and all(d.shape[1] == 6 for d in dets)
    assert type(task.feature_layer(model)).__name__ == "Conv2dNormActivation"


def test_presets_load():
    from benchmarks.grid import expand, load_sweep

    for name in ("detection-quick", "detection-voc"):
        grid = load_sweep(name)
        assert grid["task"] == "detection" and len(expand(grid)) >= 30
