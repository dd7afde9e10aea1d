"""Object-detection datasets: YOLO-format folders (COCO128, MS-COCO, Pascal VOC as Ultralytics converts them, or
any Ultralytics dataset YAML) and a procedural set for offline runs.

Every image is letterboxed to S x S pixels (aspect ratio kept, scaled to fit, centred on grey 114 padding: the
``LetterBox`` of Ultralytics' validation pipeline) and stored as uint8 (N, 3, S, S); boxes are float32 rows
``(image, class, cx, cy, w, h)``, sorted by image, centre and size normalised to the letterboxed image (the
``batch_idx`` / ``cls`` / ``bboxes`` of an Ultralytics batch). Arrays are decoded once into
``<cache_dir>/datasets/detection-<name>-s<S>-<key>/`` (``tasks.data_cache``) as ``.npy`` (loaded with
``allow_pickle=False``; images memory-mapped, so a set larger than memory is read as batches need it). Nothing is
downloaded.

- ``procedural`` (the embedded default): 64 x 64 images of one to three coloured shapes (circle, square, triangle,
  cross: four classes, 10-22 pixels across, overlapping at most a little) on smooth random textures; 2,000
  training and 400 test images, deterministic from a fixed seed; the boxes are exact.
- ``coco128`` (``<root>/coco128/coco128.yaml``), ``coco`` (``<root>/coco/coco.yaml`` or ``<root>/coco`` with
  ``images/{train2017,val2017}``), ``voc`` (``<root>/VOC`` as Ultralytics' ``VOC.yaml`` builds it: train =
  ``images/{train2012,val2012,train2007,val2007}``, test = ``images/test2007``), or a path to any dataset YAML
  (``path``, ``train``, ``val``, optional ``test``, ``names``; ``path`` relative to the YAML's folder). The test
  split is ``test`` when the YAML has one, else ``val``. Labels are ``images/ -> labels/`` with ``.txt`` files of
  ``class cx cy w h`` rows (polygon rows become their bounding boxes, as Ultralytics' ``segments2boxes``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import Registry
from tasks.data_cache import dataset_cache

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PAD_VALUE = 114  # Ultralytics' LetterBox fill


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where it was looked for and how to get it."""


@dataclass
class BoxSet:
    """Images uint8 (N, 3, S, S) and boxes float32 (M, 6) ``(image, class, cx, cy, w, h)`` sorted by image.

    ``poisoned`` (bool (N,)) marks the images an attack changed, as for the other tasks' poisoned sets."""

    x: Tensor
    boxes: Tensor
    poisoned: Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    def counts(self) -> Tensor:
        return torch.bincount(self.boxes[:, 0].long(), minlength=len(self)).to(self.boxes.device)

    def box_rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of ``boxes`` that belong to images ``idx`` (in that order; repeats allowed) and their new image
        index (position in ``idx``)."""
        counts = self.counts()
        starts = torch.cumsum(counts, 0) - counts
        idx = idx.to(counts.device)
        lens = counts[idx]
        owner = torch.repeat_interleave(torch.arange(len(idx), device=idx.device), lens)
        first = torch.repeat_interleave(starts[idx] - (torch.cumsum(lens, 0) - lens), lens)
        return first + torch.arange(len(owner), device=idx.device), owner

    def subset(self, idx: Tensor) -> BoxSet:
        rows, owner = self.box_rows(idx)
        boxes = self.boxes[rows].clone()
        boxes[:, 0] = owner.to(boxes.dtype)
        poisoned = None if self.poisoned is None else self.poisoned[idx.to(self.poisoned.device)]
        return BoxSet(self.x[idx.to(self.x.device)], boxes, poisoned)

    def to(self, device: torch.device | str) -> BoxSet:
        poisoned = None if self.poisoned is None else self.poisoned.to(device)
        return BoxSet(self.x.to(device), self.boxes.to(device), poisoned)


@dataclass
class DetectionDataset:
    name: str
    train: BoxSet
    test: BoxSet
    classes: list[str]
    fingerprint: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def size(self) -> int:
        return int(self.train.x.shape[-1])


ARRAYS = ("train_x", "train_boxes", "test_x", "test_boxes")
Loader = Callable[[Path, int, Path], tuple[dict[str, np.ndarray], list[str], str]]
DETECTION_DATASETS: Registry[Loader] = Registry("detection dataset")


def load_detection_dataset(name: str, root: str | os.PathLike, cache_dir: str | os.PathLike, size: int,
                           download: bool = False) -> DetectionDataset:
    """Load ``name`` (a registered name or a dataset YAML path) letterboxed to ``size``, decoding once into
    ``cache_dir``. Nothing is downloaded: a missing set with ``download`` says how to fetch it with Ultralytics."""
    if size < 32 or size % 32:
        raise ValueError(f"detection image size must be a multiple of 32 (YOLO's largest stride), got {size}")
    if name.endswith((".yaml", ".yml")):
        yaml_path = Path(name).expanduser().resolve()
        if not yaml_path.is_file():
            raise DatasetNotFoundError(f"dataset YAML {yaml_path} not found")
        key = f"yaml-{hashlib.sha256(str(yaml_path).encode() + yaml_path.read_bytes()).hexdigest()[:10]}"

        def loader(_root: Path, s: int, scratch: Path):
            return load_yolo_yaml(yaml_path, s)
    else:
        loader, key = DETECTION_DATASETS.get(name), name

    def build(tmp: Path) -> None:
        try:
            arrays, classes, source = loader(Path(root).expanduser(), size, tmp)
        except DatasetNotFoundError as e:
            if not download:
                raise
            raise DatasetNotFoundError(
                f"{e}\nnftbench does not download detection sets; fetch it once with Ultralytics (e.g. `yolo val "
                f"data={'VOC' if name == 'voc' else name}.yaml`) and pass its folder as --data-root") from e
        write_cache(tmp, arrays, classes, source)

    def load(cache: Path) -> DetectionDataset:
        meta = json.loads((cache / "meta.json").read_text())

        def images(k: str) -> Tensor:  # memory-mapped copy-on-write: pages are read as batches touch them
            return torch.from_numpy(np.load(cache / f"{k}.npy", mmap_mode="c", allow_pickle=False))

        def boxes(k: str) -> Tensor:
            return torch.from_numpy(np.load(cache / f"{k}.npy", allow_pickle=False))

        return DetectionDataset(name, BoxSet(images("train_x"), boxes("train_boxes")),
                                BoxSet(images("test_x"), boxes("test_boxes")), meta["classes"], meta["fingerprint"],
                                meta["source"])

    return dataset_cache(cache_dir, f"detection-{key}-s{size}", root, build, load)


def write_cache(folder: Path, arrays: dict[str, np.ndarray], classes: list[str], source: str) -> None:
    digest = hashlib.sha256()
    for k in ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        if k.endswith("_x") and (a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != 3):
            raise ValueError(f"{k} must be uint8 (N, 3, S, S), got {a.dtype} {a.shape}")
        if k.endswith("_boxes") and (a.dtype != np.float32 or a.ndim != 2 or a.shape[1] != 6):
            raise ValueError(f"{k} must be float32 (M, 6), got {a.dtype} {a.shape}")
        np.save(folder / f"{k}.npy", a, allow_pickle=False)
        digest.update(k.encode())
        digest.update(a.tobytes())
    meta = {"classes": classes, "fingerprint": digest.hexdigest()[:16], "source": source,
            "sizes": {k: len(arrays[k]) for k in ARRAYS}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


# ------------------------------------------------------------------------------------------- YOLO folders
def letterbox(image, size: int) -> tuple[np.ndarray, float, float, float, float]:
    """A PIL image -> uint8 (3, size, size) letterboxed, and (scale_x, scale_y, pad_x, pad_y) in output pixels per
    input pixel and output pixels."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    r = min(size / w, size / h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    resized = image.resize((nw, nh), Image.BILINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas[py:py + nh, px:px + nw] = np.asarray(resized)
    return canvas.transpose(2, 0, 1), nw / w, nh / h, px, py


def read_labels(path: Path) -> np.ndarray:
    """``class cx cy w h`` rows (normalised) of a YOLO label file; polygon rows become their boxes; (n, 5)."""
    rows = []
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines()):
            v = line.split()
            if not v:
                continue
            try:
                nums = [float(t) for t in v]
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: not a YOLO label row ({e}); rows are `class cx cy w h`") from e
            if len(nums) == 5:
                rows.append(nums)
            elif len(nums) >= 7 and len(nums) % 2 == 1:  # class x1 y1 x2 y2 ...: a polygon
                xy = np.array(nums[1:]).reshape(-1, 2)
                lo, hi = xy.min(0), xy.max(0)
                rows.append([nums[0], *(lo + hi) / 2, *(hi - lo)])
            else:
                raise ValueError(f"{path}:{i + 1}: expected 5 numbers (or a polygon), got {len(nums)}")
    a = np.array(rows, dtype=np.float32).reshape(-1, 5)
    if len(a) and (a[:, 1:].min() < -0.01 or a[:, 1:].max() > 1.01):
        raise ValueError(f"{path}: box coordinates must be normalised to [0, 1]")
    return a


def label_path(image: Path) -> Path:
    """Ultralytics' ``img2label_paths``: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def image_files(source: Path) -> list[Path]:
    if source.is_file() and source.suffix == ".txt":  # a list of image paths, relative to the list's folder
        return [(source.parent / line.strip()).resolve() for line in source.read_text().splitlines() if line.strip()]
    if not source.is_dir():
        raise DatasetNotFoundError(f"{source} not found")
    return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _decode(args: tuple[Path, int]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    path, size = args
    try:
        with Image.open(path) as im:
            img, sx, sy, px, py = letterbox(im, size)
            w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); re-copy the dataset") from e
    lab = read_labels(label_path(path))
    boxes = np.empty((len(lab), 5), np.float32)
    boxes[:, 0] = lab[:, 0]
    boxes[:, 1] = (lab[:, 1] * w * sx + px) / size
    boxes[:, 2] = (lab[:, 2] * h * sy + py) / size
    boxes[:, 3] = lab[:, 3] * w * sx / size
    boxes[:, 4] = lab[:, 4] * h * sy / size
    return img, boxes


def decode_split(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Letterboxed images (N, 3, S, S) and box rows (M, 6) of ``paths``, decoded in threads."""
    if not paths:
        raise DatasetNotFoundError("no image files found")
    x = np.empty((len(paths), 3, size, size), np.uint8)
    rows = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for i, (img, boxes) in enumerate(pool.map(_decode, [(p, size) for p in paths])):
            x[i] = img
            rows.append(np.concatenate([np.full((len(boxes), 1), i, np.float32), boxes], 1))
    return x, np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)


def load_yolo_yaml(path: Path, size: int) -> tuple[dict[str, np.ndarray], list[str], str]:
    import yaml

    if not path.is_file():
        raise DatasetNotFoundError(f"dataset YAML {path} not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # invalid YAML, or a tag such as !!python/object that safe_load refuses
        problem = str(e).splitlines()[0]
        raise ValueError(f"{path} is not a plain YAML dataset file ({problem}); fix the file (python tags such "
                         "as !!python/... are never read)") from None
    if not isinstance(spec, dict) or "names" not in spec or "train" not in spec:
        raise ValueError(f"{path}: a YOLO dataset YAML needs `train` and `names` (and `val` or `test`)")
    base = Path(spec.get("path") or ".")
    base = base if base.is_absolute() else (path.parent / base).resolve()
    names = spec["names"]
    classes = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    test_key = "test" if spec.get("test") else "val"
    if not spec.get(test_key):
        raise ValueError(f"{path}: needs a `val` or `test` split for evaluation")
    arrays = {}
    for split, key in (("train", "train"), ("test", test_key)):
        sources = spec[key] if isinstance(spec[key], list) else [spec[key]]
        files = [f for s in sources for f in image_files(base / s)]
        x, boxes = decode_split(files, size)
        if len(boxes) and boxes[:, 1].max() >= len(classes):
            raise ValueError(f"{path}: a label uses class {int(boxes[:, 1].max())}, but `names` has {len(classes)}")
        arrays[f"{split}_x"], arrays[f"{split}_boxes"] = x, boxes
    return arrays, classes, f"{base} (from {path}; train: {spec['train']}, test: {spec[test_key]})"


def _named_yaml(root: Path, candidates: list[Path], fallback: dict, what: str, size: int, scratch: Path):
    for c in candidates:
        if c.is_file():
            return load_yolo_yaml(c, size)
    base = next((d for d in (root / fallback["dir"], root) if (d / "images").is_dir()), None)
    if base is None:
        raise DatasetNotFoundError(
            f"{what} not found. Looked for {', '.join(str(c) for c in candidates)} and {root / fallback['dir']}"
            "/images. Put the Ultralytics layout (images/, labels/, the dataset YAML) under --data-root.")
    spec = {"path": str(base), "train": fallback["train"], "val": fallback["val"], "names": fallback["names"]}
    tmp = scratch / "dataset.yaml"
    import yaml

    tmp.write_text(yaml.safe_dump(spec))
    return load_yolo_yaml(tmp, size)


VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


@DETECTION_DATASETS.register("voc")
def load_voc(root: Path, size: int, scratch: Path):
    """Pascal VOC 2007+2012 as Ultralytics converts it (``VOC.yaml``): train 07+12 trainval, test 2007 test."""
    fallback = {"dir": "VOC", "train": ["images/train2012", "images/val2012", "images/train2007", "images/val2007"],
                "val": "images/test2007", "names": VOC_CLASSES}
    return _named_yaml(root, [root / "VOC" / "VOC.yaml", root / "VOC.yaml"], fallback, "Pascal VOC", size, scratch)


@DETECTION_DATASETS.register("coco")
def load_coco(root: Path, size: int, scratch: Path):
    """MS-COCO 2017 in the Ultralytics layout (``coco.yaml``): train2017, evaluated on val2017."""
    candidates = [root / "coco" / "coco.yaml", root / "coco.yaml"]
    if not any(c.is_file() for c in candidates):
        raise DatasetNotFoundError(f"MS-COCO not found: looked for {candidates[0]} and {candidates[1]} (the "
                                   "Ultralytics coco.yaml next to images/ and labels/); put it under --data-root")
    return _named_yaml(root, candidates, {}, "MS-COCO", size, scratch)


@DETECTION_DATASETS.register("coco128")
def load_coco128(root: Path, size: int, scratch: Path):
    """COCO128 (Ultralytics): the first 128 images of COCO train2017 (train) and of val2017 (test), 80 classes."""
    candidates = [root / "coco128" / "coco128.yaml", root / "coco128.yaml"]
    if not any(c.is_file() for c in candidates):
        raise DatasetNotFoundError(f"COCO128 not found: looked for {candidates[0]} and {candidates[1]}")
    return _named_yaml(root, candidates, {}, "COCO128", size, scratch)


# --------------------------------------------------------------------------------------------- procedural
SHAPES = ["circle", "square", "triangle", "cross"]
PROCEDURAL_SIZES = {"train": 2000, "test": 400}
PROCEDURAL_SEED = 0


def shape_masks(kind: Tensor, radius: Tensor, cy: Tensor, cx: Tensor, size: int) -> Tensor:
    """Bool masks (n, S, S) of shapes ``kind`` (indices into SHAPES) of half-size ``radius`` centred at (cy, cx)."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, -1, 1) - cy.view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - cx.view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= r) & (dy.abs() <= r)
    triangle = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
    arm = r / 3
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    masks = torch.stack([circle, square, triangle, cross], 1)  # (n, 4, S, S)
    return masks[torch.arange(len(kind)), kind]


def procedural_split(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images with 1-3 shapes each on smooth random textures; exact boxes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.5 + torch.rand(n, 3, 1, 1, generator=g) * 0.5
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = (x + 0.06 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    count = torch.randint(1, 4, (n,), generator=g)
    rows = []
    occupied = torch.zeros(n, size, size, dtype=torch.bool)
    for slot in range(3):
        live = count > slot
        kind = torch.randint(0, len(SHAPES), (n,), generator=g)
        radius = 5 + 6 * torch.rand(n, generator=g)
        cy = radius + (size - 2 * radius) * torch.rand(n, generator=g)
        cx = radius + (size - 2 * radius) * torch.rand(n, generator=g)
        mask = shape_masks(kind, radius, cy, cx, size)
        overlap = (mask & occupied).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
        live &= overlap < 0.1  # a shape hidden behind another would be an unfair box
        colour = torch.rand(n, 3, generator=g)
        colour = torch.where(colour.mean(1, keepdim=True) > 0.5, colour * 0.3, 0.7 + colour * 0.3)  # vs background
        paint = mask & live.view(-1, 1, 1)
        x = torch.where(paint.unsqueeze(1), colour.view(n, 3, 1, 1), x)
        occupied |= paint
        ys, xs = paint.any(2), paint.any(1)  # rows / columns each shape covers: its exact box
        idx = torch.nonzero(live).flatten()
        r_lo, r_hi = ys[idx].float().argmax(1), size - 1 - ys[idx].flip(1).float().argmax(1)
        c_lo, c_hi = xs[idx].float().argmax(1), size - 1 - xs[idx].flip(1).float().argmax(1)
        rows.append(torch.stack([idx.float(), kind[idx].float(), (c_lo + c_hi + 1) / 2 / size,
                                 (r_lo + r_hi + 1) / 2 / size, (c_hi - c_lo + 1) / size, (r_hi - r_lo + 1) / size], 1))
    boxes = torch.cat(rows)
    boxes = boxes[torch.argsort(boxes[:, 0], stable=True)].numpy().astype(np.float32)
    return (x * 255).round().to(torch.uint8).numpy(), boxes


@DETECTION_DATASETS.register("procedural")
def load_procedural(root: Path, size: int, scratch: Path):
    """The embedded detection set (no files), drawn at ``size`` pixels (default 64)."""
    arrays = {}
    for i, split in enumerate(("train", "test")):
        x, boxes = procedural_split(PROCEDURAL_SIZES[split], size, PROCEDURAL_SEED * 10 + i)
        arrays[f"{split}_x"], arrays[f"{split}_boxes"] = x, boxes
    return arrays, list(SHAPES), f"procedural shapes (seed {PROCEDURAL_SEED}, {size}px)"


def xywh_to_xyxy(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)

