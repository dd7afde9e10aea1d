"""A user's own images: ImageFolder trees read with numeric-aware class order, and the ``imagefolder`` dataset.

``<dir>/<class>/*.png``: classes sort as people number them ("2" before "10"), or in the order a caller gives.
Files that are not images (by extension) are skipped and counted; an empty folder or class is an error naming it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.image_data import IMAGE_DATASETS, DatasetNotFoundError, ImageSet, decode_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff"}


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders digit runs by value: ``2`` < ``10``, ``img2`` < ``img10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


@dataclass
class FolderScan:
    """Image paths and labels of an ImageFolder tree, its class order and the non-image files skipped."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    skipped: int


def scan_image_folder(folder: str | Path, classes: Sequence[str] | None = None, flat_ok: bool = False) -> FolderScan:
    """Scan ``folder/<class>/*`` (numeric-aware class order, or ``classes``'s). ``flat_ok``: a folder of images
    without class sub-folders is accepted, labelled -1 (triggered images whose true class is unknown)."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a folder; give an ImageFolder tree (<dir>/<class>/*.png)")
    subdirs = sorted((p.name for p in d.iterdir() if p.is_dir()), key=natural_key)
    if not subdirs:
        if not flat_ok:
            raise ValueError(f"{d} has no class sub-folders; put each class's images in {d}/<class name>/")
        paths, skipped = _images_in(d)
        if not paths:
            raise ValueError(f"{d} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return FolderScan(paths, [-1] * len(paths), list(classes or []), skipped)
    order = list(classes) if classes is not None else subdirs
    unknown = [s for s in subdirs if s not in order]
    if unknown:
        raise ValueError(f"{d} has class folder(s) {unknown[:5]} not in the class list {order[:10]}; "
                         "rename them or fix --classes")
    paths, labels, skipped = [], [], 0
    for i, c in enumerate(order):
        if not (d / c).is_dir():
            continue
        files, n_skipped = _images_in(d / c)
        if not files and classes is None:
            raise ValueError(f"class folder {d / c} holds no image files; add images or remove the folder")
        paths += files
        labels += [i] * len(files)
        skipped += n_skipped
    if not paths:
        raise ValueError(f"{d} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderScan(paths, labels, order, skipped)


def _images_in(folder: Path) -> tuple[list[str], int]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    images = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))
    return [str(p) for p in images], len(files) - len(images)


def read_images(paths: Sequence[str], channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """Decode to uint8 (N, channels, H, W); ``size`` (H, W) resizes (bilinear). An image whose channel count is
    not the model's (grayscale for an RGB model, or the reverse) is refused, naming the file."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"the model takes {channels} input channels; image folders give 1 (grayscale) or 3 (RGB)")
    out = []
    for p in paths:
        with Image.open(p) as im:
            got = 1 if im.mode in ("L", "I", "I;16", "1") else 3
            if got != channels:
                kind = {1: "grayscale", 3: "RGB"}
                raise ValueError(f"{p} is {kind[got]} ({im.mode}) but the model takes {kind[channels]} input "
                                 f"({channels} channel(s)); convert the images (PIL: Image.convert('{mode}'))")
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    shapes = sorted({a.shape for a in out})
    if len(shapes) != 1:
        raise ValueError(f"images have different sizes {shapes[:3]}; pass --input-size H,W to resize them")
    return np.stack(out)


def image_folder_set(scan: FolderScan, channels: int, size: tuple[int, int] | None) -> ImageSet:
    x = read_images(scan.paths, channels, size)
    return ImageSet(torch.from_numpy(x), torch.tensor(scan.labels, dtype=torch.long))


def fingerprint(s: ImageSet) -> str:
    digest = hashlib.sha256(s.x.numpy().tobytes())
    digest.update(s.y.numpy().tobytes())
    return digest.hexdigest()[:16]


@IMAGE_DATASETS.register("imagefolder")
def load_image_folder(root: Path, download: bool, image_size: int | None, scratch: Path):
    """A user's own dataset: ``--data-root DIR`` holding ``train/<class>/`` and ``test/<class>/`` (numeric-aware
    class order, taken from train/). Images are decoded as RGB and resized to ``image_size`` when given."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetNotFoundError(f"imagefolder: expected {root}/train/<class>/ and {root}/test/<class>/; "
                                   "point --data-root at the folder holding train/ and test/")
    train = scan_image_folder(root / "train")
    test = scan_image_folder(root / "test", train.classes)
    arrays = {"train_x": decode_images(train.paths, image_size), "train_y": np.asarray(train.labels, dtype=np.int64),
              "test_x": decode_images(test.paths, image_size), "test_y": np.asarray(test.labels, dtype=np.int64)}
    return arrays, train.classes, str(root.resolve())


load_image_folder.per_root = True  # one cache per --data-root: two users' folders never share one
