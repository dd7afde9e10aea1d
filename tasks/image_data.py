"""Image datasets: read a user's local copy in its standard layout, decode once, cache as uint8 arrays.

Each dataset decodes to ``uint8`` arrays (N, C, H, W) saved as ``.npy`` under the cache directory
(loaded with ``allow_pickle=False``, memory-mapped, so ImageNet-size caches need no RAM). Small
datasets are then moved whole to the device by the task; augmentation happens there, in batches.
Nothing is downloaded unless the caller passes ``download=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.base import LabelledTensors, Registry
from tasks.data_cache import dataset_cache

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".JPEG")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where it was looked for and how to get it."""


class ImageSet(LabelledTensors):
    """Images as uint8 (N, C, H, W) and labels as int64 (N,) (see :class:`tasks.base.LabelledTensors`)."""


@dataclass
class ImageDataset:
    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


ARRAYS = ("train_x", "train_y", "test_x", "test_y")
Loader = Callable[[Path, bool, int | None, Path], tuple[dict[str, np.ndarray], list[str], str]]
IMAGE_DATASETS: Registry[Loader] = Registry("image dataset")


def load_image_dataset(
    name: str, root: str | os.PathLike, cache_dir: str | os.PathLike, download: bool = False,
    image_size: int | None = None,
) -> ImageDataset:
    """Load ``name`` from ``root`` (decoding once into a cache under ``cache_dir`` keyed by the data root and
    checked against its source files: ``tasks.data_cache``) and return CPU tensors."""
    loader = IMAGE_DATASETS.get(name)
    tag = name if image_size is None else f"{name}-{image_size}"

    def build(tmp: Path) -> None:
        write_cache(tmp, *loader(Path(root).expanduser(), download, image_size, tmp))

    def load(cache: Path) -> ImageDataset:
        meta = json.loads((cache / "meta.json").read_text())
        a = {k: torch.from_numpy(np.load(cache / f"{k}.npy", mmap_mode="c", allow_pickle=False)) for k in ARRAYS}
        return ImageDataset(
            name=name,
            train=ImageSet(a["train_x"], a["train_y"].long()),
            test=ImageSet(a["test_x"], a["test_y"].long()),
            classes=meta["classes"],
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            fingerprint=meta["fingerprint"],
            source=meta["source"],
        )

    return dataset_cache(cache_dir, tag, root, build, load)


def write_cache(folder: Path, arrays: dict[str, np.ndarray], classes: list[str], source: str) -> None:
    """Save arrays (those a loader already decoded into ``folder`` stay where they are) and meta.json."""
    for k in ARRAYS:
        a = arrays[k]
        if k.endswith("_x") and (a.dtype != np.uint8 or a.ndim != 4):
            raise ValueError(f"{k} must be uint8 (N, C, H, W), got {a.dtype} {a.shape}")
    digest = hashlib.sha256()
    for k in ARRAYS:
        a = arrays[k]
        if isinstance(a, np.memmap) and Path(a.filename).resolve() == (folder / f"{k}.npy").resolve():
            a.flush()
        else:
            np.save(folder / f"{k}.npy", np.ascontiguousarray(a), allow_pickle=False)
        digest.update(k.encode())
        digest.update(np.ascontiguousarray(a[:: max(1, len(a) // 4096)]).tobytes())
    x = arrays["train_x"][:: max(1, len(arrays["train_x"]) // 10000)].astype(np.float64) / 255
    meta = {
        "classes": classes,
        "mean": x.mean(axis=(0, 2, 3)).round(4).tolist(),
        "std": x.std(axis=(0, 2, 3)).round(4).tolist(),
        "fingerprint": digest.hexdigest()[:16],
        "source": source,
        "sizes": {k: len(arrays[k]) for k in ARRAYS},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def find_dir(root: Path, candidates: Sequence[str], marker: Callable[[Path], bool], name: str, how: str) -> Path:
    tried = [root / c if c else root for c in candidates]
    for d in tried:
        if marker(d):
            return d
    raise DatasetNotFoundError(
        f"{name} not found. Looked in: {', '.join(str(t) for t in tried)}. {how}"
    )


def _decode(args: tuple[str, int | None]) -> np.ndarray:
    from PIL import Image

    path, size = args
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_images(paths: Sequence[str], size: int | None, out: Path | None = None) -> np.ndarray:
    """Decode image files in parallel into one uint8 (N, 3, H, W) array (resize + centre crop to ``size``).

    With ``out`` (and a fixed ``size``) images stream into a memory-mapped ``.npy`` file there, so a
    dataset larger than RAM (ImageNet) decodes in constant memory.
    """
    if not paths:
        raise DatasetNotFoundError("no image files found")
    workers = min(len(paths) // 2000 + 1, os.cpu_count() or 1)
    jobs = [(p, size) for p in paths]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    images = pool.map(_decode, jobs, chunksize=256) if pool else map(_decode, jobs)
    try:
        if out is not None and size is not None:
            array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
            for i, im in enumerate(images):
                array[i] = im
            return array
        images = list(images)
    finally:
        if pool:
            pool.shutdown()
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {sorted(shapes)[:3]}; pass an image size to resize them")
    return np.stack(images)


def scan_class_folders(folder: Path, classes: Sequence[str] | None = None, sub: str = ""
                       ) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder layout ``folder/<class>/<sub>/*.jpg``; classes sorted unless given."""
    classes = list(classes) if classes is not None else sorted(d.name for d in folder.iterdir() if d.is_dir())
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (folder / c / sub).iterdir() if p.suffix in IMG_EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [i] * len(files)
    return paths, labels, classes


def _image_folder_split(folder: Path, size: int | None, classes: Sequence[str] | None = None, sub: str = "",
                        out: Path | None = None):
    paths, labels, classes = scan_class_folders(folder, classes, sub)
    return decode_images(paths, size, out), np.asarray(labels, dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------


@IMAGE_DATASETS.register("digits")
def load_digits(root: Path, download: bool, image_size: int | None, scratch: Path):
    """sklearn's bundled 8x8 handwritten digits (1,797 images), upsampled to 16x16, one channel.

    Always available (it ships inside scikit-learn): the embedded quick suite and the tests use it.
    Stratified 70/30 train/test split with a fixed seed.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    size = image_size or 16
    d = sk_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    arrays = {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}
    return arrays, [str(i) for i in range(10)], "sklearn.datasets.load_digits"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches (dicts of numpy arrays and lists) and refuses any other object."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        return super().find_class(module, name)


def _cifar_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


@IMAGE_DATASETS.register("cifar10")
def load_cifar10(root: Path, download: bool, image_size: int | None, scratch: Path):
    """CIFAR-10 (Krizhevsky, 2009): torchvision's ``cifar-10-batches-py`` or an ImageFolder copy
    (``train/<class>/*.jpg``, ``test/<class>/*.jpg``, e.g. ``../shared/data/cifar10-jpeg``)."""
    def is_folder(d: Path) -> bool:
        return (d / "train" / "airplane").is_dir() and (d / "test" / "airplane").is_dir()

    def is_batches(d: Path) -> bool:
        return (d / "data_batch_1").is_file() and (d / "test_batch").is_file()

    for d in (root, root / "cifar10-jpeg", root / "cifar10"):
        if is_folder(d):
            xtr, ytr, _ = _image_folder_split(d / "train", image_size, CIFAR10_CLASSES)
            xte, yte, _ = _image_folder_split(d / "test", image_size, CIFAR10_CLASSES)
            return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, CIFAR10_CLASSES, str(d)
    if download and not is_batches(root / "cifar-10-batches-py"):
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    batches = find_dir(
        root, ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"], is_batches, "CIFAR-10",
        f"Put an ImageFolder copy (train/<class>/, test/<class>/) or torchvision's cifar-10-batches-py under "
        f"--data-root {root}, or pass --download to fetch it.",
    )
    xtr, ytr = _cifar_batches(batches, [f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = _cifar_batches(batches, ["test_batch"])
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, CIFAR10_CLASSES, str(batches)


@IMAGE_DATASETS.register("gtsrb")
def load_gtsrb(root: Path, download: bool, image_size: int | None, scratch: Path):
    """GTSRB (Stallkamp et al., 2012) in torchvision's layout: ``gtsrb/GTSRB/Training/<00000..00042>/*.ppm``,
    ``gtsrb/GTSRB/Final_Test/Images/*.ppm`` and ``gtsrb/GT-final_test.csv``. Resized to 32x32."""
    base = root / "gtsrb"
    if download and not (base / "GTSRB" / "Training").is_dir():
        from torchvision.datasets import GTSRB

        GTSRB(str(root), split="train", download=True)
        GTSRB(str(root), split="test", download=True)
    find_dir(
        base, ["GTSRB/Training"], Path.is_dir, "GTSRB",
        f"Expected torchvision's layout under --data-root {root}, or pass --download.",
    )
    csv = base / "GT-final_test.csv"
    if not csv.is_file():
        raise DatasetNotFoundError(f"GTSRB test labels {csv} not found; pass --download or copy "
                                   "GT-final_test.csv there")
    size = image_size or 32
    xtr, ytr, classes = _image_folder_split(base / "GTSRB" / "Training", size)
    rows = [line.split(";") for line in csv.read_text().splitlines()[1:] if line.strip()]
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    xte = decode_images([str(test_dir / r[0]) for r in rows], size)
    yte = np.asarray([int(r[-1]) for r in rows], dtype=np.int64)
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, classes, str(base)


@IMAGE_DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(root: Path, download: bool, image_size: int | None, scratch: Path):
    """Tiny-ImageNet-200 in its official layout: ``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/,
    val/images/, val/val_annotations.txt}``; the labelled val split is the test set. 64x64."""
    base = root / "tiny-imagenet-200"
    if download and not (base / "wnids.txt").is_file():
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))
    find_dir(
        base, [""], lambda d: (d / "wnids.txt").is_file(), "Tiny-ImageNet",
        f"Unzip tiny-imagenet-200.zip under --data-root {root}, or pass --download.",
    )
    wnids = (base / "wnids.txt").read_text().split()
    size = image_size or 64
    xtr, ytr, _ = _image_folder_split(base / "train", size, wnids, sub="images")
    index = {w: i for i, w in enumerate(wnids)}
    rows = [line.split("\t") for line in (base / "val" / "val_annotations.txt").read_text().splitlines() if line]
    xte = decode_images([str(base / "val" / "images" / r[0]) for r in rows], size)
    yte = np.asarray([index[r[1]] for r in rows], dtype=np.int64)
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, wnids, str(base)


@IMAGE_DATASETS.register("imagenet")
def load_imagenet(root: Path, download: bool, image_size: int | None, scratch: Path):
    """ImageNet-1k as ImageFolder (``imagenet/{train,val}/<wnid>/*.JPEG``), no download (licence).

    Decoded once at ``image_size`` (default 224: short side resized, centre-cropped) into a
    memory-mapped cache of ~190 GB, streamed to disk while decoding. Training augmentation is the task's
    batched pad-crop + flip on these 224x224 images (not torchvision's random-resized crop).
    """
    base = find_dir(
        root, ["imagenet", ""], lambda d: (d / "train").is_dir() and (d / "val").is_dir(), "ImageNet",
        "ImageNet cannot be downloaded automatically: place train/<wnid>/ and val/<wnid>/ folders "
        f"(val sorted into class folders) under --data-root {root}/imagenet.",
    )
    size = image_size or 224
    xtr, ytr, classes = _image_folder_split(base / "train", size, out=scratch / "train_x.npy")
    xte, yte, _ = _image_folder_split(base / "val", size, classes, out=scratch / "test_x.npy")
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, classes, str(base)
