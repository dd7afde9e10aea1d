"""Bring your own model (issue 22): a torchvision ResNet-18 with random weights, 3 classes, a generated ImageFolder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

torchvision = pytest.importorskip("torchvision")

from benchmarks.cli import main  # noqa: E402
from tasks.image_folder import natural_key, scan_image_folder  # noqa: E402

CLASSES = ["1", "2", "10"]  # numeric-aware order: "2" before "10"
QUICK_NFT = ["--set", "steps=2", "--set", "batch_size=8"]


def write_folder(root: Path, per_class: int, size: int = 16, mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    save_file(net.state_dict(), str(root / "suspect.safetensors"))
    write_folder(root / "clean", 4)
    write_folder(root / "test", 2, seed=1)
    return root, net


def purify_args(root: Path, *extra: str) -> list[str]:
    return ["purify", "--model", "torchvision:resnet18", "--weights", str(root / "suspect.safetensors"),
            "--clean-data", str(root / "clean"), "--runs-dir", str(root / "runs"),
            "--results", str(root / "runs" / "results.csv"), "--device", "cpu", *QUICK_NFT, *extra]


def test_class_order_is_numeric_aware(tmp_path):
    assert sorted(["10", "2", "1", "img10", "img2"], key=natural_key) == ["1", "2", "10", "img2", "img10"]
    write_folder(tmp_path, 1)
    assert scan_image_folder(tmp_path).classes == CLASSES
    assert scan_image_folder(tmp_path, ["10", "2", "1"]).classes == ["10", "2", "1"]


def test_cli_purifies_reloads_into_torchvision_and_writes_record_and_row(byo, capsys):
    root, net = byo
    out = root / "out"
    main(purify_args(root, "--normalize", "none", "--test-data", str(root / "test"), "--out", str(out)))
    printed = capsys.readouterr().out
    assert "not measured: ASR and RA" in printed and "C-ACC" in printed
    state = load_file(str(out / "model.safetensors"))
    original = net.state_dict()
    assert sorted(state) == sorted(original) and all(state[k].shape == original[k].shape for k in original)
    reloaded = torchvision.models.resnet18(num_classes=3)
    reloaded.load_state_dict(state)  # strict: the user's own class takes the purified weights back
    changed = [k for k in original if k.endswith("bn2.weight") and not torch.equal(state[k], original[k])]
    assert changed, "NFT folded no mask into the BatchNorm weights"
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "ok" and record["config"]["task"]["classes"] == CLASSES
    assert record["before"]["clean_acc"] is not None and record["before"]["asr"] is None
    assert record["clean_samples"] == 12 and record["config"]["defense_params"] == {"steps": 2, "batch_size": 8}
    assert (root / "runs" / "records" / f"{record['run_id']}.json").is_file()
    rows = list(csv.DictReader(open(root / "runs" / "results.csv")))
    assert [r["run_id"] for r in rows] == [record["run_id"]]
    assert rows[0]["defense"] == "nft[batch_size=8,steps=2]" and rows[0]["model"] == "torchvision:resnet18"
    from benchmarks.leaderboard import records_frame

    df, notes = records_frame([record])
    assert not notes and len(df) == 1


def test_python_api_with_tensors_measures_asr_and_hides_test_data_from_the_defence(byo, monkeypatch):
    from benchmarks.api import purify
    from defenses import DEFENSES
    from defenses.base import DefenseSpec, NoDefenseConfig

    _, net = byo
    seen = {}

    def peek(model, task, clean, cfg, seed=0):
        for name in ("test", "evaluate", "data"):
            with pytest.raises(AttributeError):
                getattr(task, name)
        seen["clean"] = len(clean)
        return model, {}

    monkeypatch.setitem(DEFENSES._items, "peek", DefenseSpec("peek", peek, NoDefenseConfig, "test"))
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))
    test = (torch.rand(9, 3, 16, 16, generator=g), torch.tensor([0, 1, 2] * 3))
    triggered = (torch.rand(9, 3, 16, 16, generator=g), torch.tensor([0, 1, 2] * 3))
    result = purify(net, clean, defense="peek", normalize="none", test=test, triggered=triggered, target=0,
                    device="cpu")
    assert seen["clean"] == 6
    before, after = result.record["before"], result.record["after"]
    assert before == after and before["asr"] is not None and before["ra"] is not None
    assert "der" in result.record and result.record["not_measured"] == []
    assert result.model is not net and type(result.model) is type(net)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        purify(net, (clean[0] * 4 - 2, clean[1]), normalize="none", device="cpu")
    from_dataset = purify(net, torch.utils.data.TensorDataset(*clean), defense="peek", normalize="none",
                          device="cpu")
    assert seen["clean"] == 6 and from_dataset.record["not_measured"] == [
        "clean accuracy (no test data)", "ASR and RA (no triggered data and target)"]


def test_a_model_from_your_own_file(byo, tmp_path):
    root, net = byo
    (tmp_path / "my_model.py").write_text("import torchvision\n\n\ndef make(num_classes):\n"
                                          "    return torchvision.models.resnet18(num_classes=num_classes)\n")
    argv = purify_args(root, "--normalize", "none", "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r"),
                       "--results", str(tmp_path / "r" / "results.csv"))
    main([f"{tmp_path / 'my_model.py'}:make" if a == "torchvision:resnet18" else a for a in argv])
    record = json.loads((tmp_path / "o" / "record.json").read_text())
    assert record["config"]["task"]["model"].endswith("my_model.py:make") and record["status"] == "ok"


def test_a_timm_model_with_its_own_normalisation(byo, tmp_path):
    """``timm:NAME`` (the optional ``timm`` extra): the model's pretrained_cfg normalisation is taken without
    --normalize, NFT folds into its BatchNorms, and the purified weights load back into timm's own class."""
    timm = pytest.importorskip("timm")
    root, _ = byo
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    save_file(net.state_dict(), str(tmp_path / "suspect.safetensors"))
    argv = purify_args(root, "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "r"),
                       "--results", str(tmp_path / "r" / "results.csv"))
    argv = [{"torchvision:resnet18": "timm:resnet18", str(root / "suspect.safetensors"):
             str(tmp_path / "suspect.safetensors")}.get(a, a) for a in argv]
    main(argv)
    record = json.loads((tmp_path / "o" / "record.json").read_text())
    assert record["status"] == "ok" and record["config"]["task"]["model"] == "timm:resnet18"
    assert record["config"]["task"]["normalize"] == [list(net.pretrained_cfg["mean"]), list(net.pretrained_cfg["std"])]
    state = load_file(str(tmp_path / "o" / "model.safetensors"))
    reloaded = timm.create_model("resnet18", pretrained=False, num_classes=3)
    reloaded.load_state_dict(state)
    bns = [f"{n}.weight" for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # timm zero-initialises each block's last BN, so at random weights only the shortcut BNs' masks get gradients
    changed = [k for k in bns if not torch.equal(state[k], net.state_dict()[k])]
    assert changed and record["defense_info"]["mask_layers"] == len(bns) - 1 == 19  # every BN but the stem's


def test_imagefolder_dataset_trains_victims_on_your_own_folders(tmp_path):
    from tasks import create_task

    write_folder(tmp_path / "data" / "train", 6)
    write_folder(tmp_path / "data" / "test", 2, seed=1)
    task = create_task("image", dataset="imagefolder", data_root=tmp_path / "data", cache_dir=tmp_path / "runs",
                       device="cpu")
    assert task.data.classes == CLASSES and len(task.data.train) == 18 and len(task.data.test) == 6
    assert task.data.shape == (3, 16, 16)


def expect_error(capsys, argv: list[str], match: str, root: Path) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert match in err, err
    assert not (root / "runs").exists() and not (root / "o").exists(), "a bad input wrote something"
    return err


@pytest.fixture
def bad(tmp_path, byo):
    root, _ = byo
    (tmp_path / "suspect.safetensors").write_bytes((root / "suspect.safetensors").read_bytes())
    write_folder(tmp_path / "clean", 2)
    return tmp_path


def test_pickle_weights_are_refused_with_the_conversion(bad, capsys):
    torch.save({"w": torch.zeros(1)}, bad / "model.pth")
    argv = purify_args(bad, "--out", str(bad / "o"))
    argv[argv.index("--weights") + 1] = str(bad / "model.pth")
    err = expect_error(capsys, argv, "pickle file", bad)
    assert "save_file(torch.load(" in err and "weights_only=True" in err


def test_wrong_model_and_class_count_are_one_error(bad, capsys):
    argv = purify_args(bad, "--out", str(bad / "o"))
    err = expect_error(capsys, [a.replace("torchvision:resnet18", "torchvision:resnet34") for a in argv],
                       "do not match the named model", bad)
    assert "layer1.2" in err  # the first keys resnet34 has and the file lacks
    expect_error(capsys, argv + ["--num-classes", "4"], "--num-classes 4 but 3 class folders", bad)
    expect_error(capsys, argv + ["--classes", "1,2,10,11"], "class-count mismatch", bad)


def test_bad_folders_are_one_error(bad, capsys):
    argv = purify_args(bad, "--out", str(bad / "o"))
    (bad / "empty").mkdir()
    expect_error(capsys, [a.replace(str(bad / "clean"), str(bad / "empty")) for a in argv], "no class sub-folders",
                 bad)
    (bad / "one" / "1").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad / "one" / "1" / "a.png")
    expect_error(capsys, [a.replace(str(bad / "clean"), str(bad / "one")) for a in argv] + ["--classes", "1,2,10"],
                 "needs at least 2", bad)
    write_folder(bad / "gray", 2, mode="L")
    expect_error(capsys, [a.replace(str(bad / "clean"), str(bad / "gray")) for a in argv], "is grayscale", bad)


def test_non_images_are_skipped_with_a_count_and_a_missing_normalize_warns(bad, capsys):
    (bad / "clean" / "1" / "notes.txt").write_text("not an image")
    main(purify_args(bad, "--out", str(bad / "o")))
    err = capsys.readouterr().err
    assert "no --normalize given and the model stores none" in err
    record = json.loads((bad / "o" / "record.json").read_text())
    assert "1 non-image file(s) in the clean data skipped" in record["notes"]
    assert record["config"]["task"]["normalize"] is None


def test_help_and_list_import_no_torch_and_the_catalogue_is_current():
    code = ("import sys, contextlib, io\nfrom benchmarks.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['list'])\n"
            "assert 'torch' not in sys.modules, 'list imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    from benchmarks import catalogue

    assert catalogue.build() == catalogue.load(), "benchmarks/catalogue.json is stale: python -m benchmarks.catalogue"


def test_sweep_seed_replaces_the_grid_seeds():
    from benchmarks.cli import grid_with_seed

    assert grid_with_seed("quick", None)["seeds"] == [0]
    assert grid_with_seed("quick", 3)["seeds"] == [3]
    with pytest.raises(ValueError, match="--seed"):
        grid_with_seed("quick", -1)
