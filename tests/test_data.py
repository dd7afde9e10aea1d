"""Dataset loaders on layouts the tests write themselves, and on ../shared/data when it exists."""

import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from tasks.image_classification import ImageClassificationTask
from tasks.image_data import CIFAR10_CLASSES, DatasetNotFoundError, load_image_dataset


def write_images(folder, n, size, colour, ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (colour, i * 10 % 255, 0)).save(folder / f"{i:04d}.{ext}")


def test_digits_shapes_and_fingerprint(tmp_path):
    d = load_image_dataset("digits", tmp_path, tmp_path)
    assert d.train.x.shape == (1257, 1, 16, 16) and d.test.x.shape == (540, 1, 16, 16)
    assert d.train.x.dtype == torch.uint8 and d.num_classes == 10
    assert d.fingerprint == load_image_dataset("digits", tmp_path, tmp_path).fingerprint


def test_cifar10_image_folder_layout(tmp_path):
    root = tmp_path / "data" / "cifar10-jpeg"
    for split, n in (("train", 3), ("test", 2)):
        for i, c in enumerate(CIFAR10_CLASSES):
            write_images(root / split / c, n, (32, 32), i * 20, "jpg")
    d = load_image_dataset("cifar10", tmp_path / "data", tmp_path / "cache")
    assert d.train.x.shape == (30, 3, 32, 32) and d.test.x.shape == (20, 3, 32, 32)
    assert d.train.y.tolist() == sorted(d.train.y.tolist()) and d.classes == CIFAR10_CLASSES


def test_cifar10_python_batches_and_refusal_of_other_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    d = load_image_dataset("cifar10", tmp_path, tmp_path / "cache")
    assert d.train.x.shape == (20, 3, 32, 32) and d.test.y.tolist() == [0, 1, 2, 3]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_image_dataset("cifar10", tmp_path, tmp_path / "cache2")


def test_gtsrb_tiny_imagenet_imagenet_layouts(tmp_path):
    g = tmp_path / "gtsrb"
    for c in range(3):
        write_images(g / "GTSRB" / "Training" / f"{c:05d}", 2, (40, 36), c * 50, "ppm")
    write_images(g / "GTSRB" / "Final_Test" / "Images", 3, (30, 30), 9, "ppm")
    (g / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        + "".join(f"{i:04d}.ppm;30;30;1;1;29;29;{i % 3}\n" for i in range(3)))
    d = load_image_dataset("gtsrb", tmp_path, tmp_path / "c1")
    assert d.train.x.shape == (6, 3, 32, 32) and d.test.y.tolist() == [0, 1, 2] and d.num_classes == 3

    t = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (t).mkdir()
    (t / "wnids.txt").write_text("\n".join(wnids))
    for w in wnids:
        write_images(t / "train" / w / "images", 2, (64, 64), 10, "JPEG")
    write_images(t / "val" / "images", 2, (64, 64), 20, "JPEG")
    (t / "val" / "val_annotations.txt").write_text("0000.JPEG\tn02\t0\t0\t10\t10\n0001.JPEG\tn01\t0\t0\t5\t5\n")
    d = load_image_dataset("tiny-imagenet", tmp_path, tmp_path / "c2")
    assert d.train.x.shape == (4, 3, 64, 64) and d.test.y.tolist() == [1, 0]

    for split in ("train", "val"):
        for w in wnids:
            write_images(tmp_path / "imagenet" / split / w, 2, (80, 60), 30, "JPEG")
    d = load_image_dataset("imagenet", tmp_path, tmp_path / "c3", image_size=48)
    assert d.train.x.shape == (4, 3, 48, 48) and d.classes == wnids


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"Looked in: .*--download"):
        load_image_dataset("cifar10", tmp_path, tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded automatically"):
        load_image_dataset("imagenet", tmp_path, tmp_path)


def test_batched_augmentation_is_crop_and_flip(tmp_path):
    task = ImageClassificationTask("digits", device="cpu", cache_dir=tmp_path)
    x = torch.arange(2 * 16 * 16, dtype=torch.uint8).view(2, 1, 16, 16)
    out = task.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):  # every output row is a (possibly flipped) contiguous run of an input row, or zeros
        row = out[i, 0, 8]
        nz = row[row > 0]
        fwd = (nz[1:] - nz[:-1])
        assert (fwd == 1).all() or (fwd == -1).all()


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg").is_dir(), reason="../shared/data/cifar10-jpeg not present")
def test_cifar10_loader_on_shared_copy(tmp_path):
    d = load_image_dataset("cifar10", SHARED_DATA, tmp_path)
    assert d.train.x.shape == (50000, 3, 32, 32) and d.test.x.shape == (10000, 3, 32, 32)
    assert torch.bincount(d.train.y).tolist() == [5000] * 10
    assert 0.45 < d.mean[0] < 0.52 and 0.2 < d.std[0] < 0.3
