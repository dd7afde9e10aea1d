"""Video datasets for the action-recognition task: clips as uint8 (N, C, T, H, W), cached once.

- ``procedural`` (embedded, no files): ten classes defined by *motion* (they differ in how the frames change, not
  in what one frame shows): a bright square that stays, moves right / left / down / up (slow), moves right / down
  fast, appears halfway, or a bar that turns clockwise / counter-clockwise; random colour, size, start position
  and background level, fresh pixel noise on every frame; positions wrap around the frame edges. 100 train and 30
  test clips per class.
- ``ucf101`` (Soomro, Zamir, Shah, 2012) and ``hmdb51`` (Kuehne et al., ICCV 2011) in their official layouts,
  decoded once with PyAV (``pip install av``; the ``video`` extra):

  - UCF101: ``<root>/UCF101/UCF-101/<Class>/v_*.avi`` and ``<root>/UCF101/ucfTrainTestlist/{classInd.txt,
    trainlist0K.txt, testlist0K.txt}``.
  - HMDB51: ``<root>/HMDB51/hmdb51/<class>/*.avi`` (the class archives unpacked) and
    ``<root>/HMDB51/testTrainMulti_7030_splits/<class>_test_splitK.txt`` (1 = train, 2 = test, 0 = unused).

  One clip per video: ``frames`` consecutive frames at 15 fps (every round(fps / 15)-th frame) from the middle
  of the video, each resized to 128x171 and centre-cropped to 128x128 (the torchvision video reference's
  ``clip_len 16``, ``frame_rate 15``, resize 128x171, following Tran et al., CVPR 2018); the task crops 112x112
  from it. The reference draws a random clip per epoch and averages ten test clips; one cached clip per video
  is this suite's simplification (it makes the decode a one-off and the data a plain array).
  Decoded clips are cached per video under ``<cache_dir>/video-clips/``, keyed by the file's path and the
  SHA-256 of its content (a changed file is decoded again), and the assembled split as every dataset is
  (``tasks.data_cache``: keyed by the data root, rebuilt when a video's size or mtime changes or the cache cannot
  be read, built under a lock).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.base import LabelledTensors, Registry
from tasks.data_cache import CLIP_CACHE, dataset_cache


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where it was looked for and how to get it."""


class VideoSet(LabelledTensors):
    """Clips as uint8 (N, C, T, H, W) and labels as int64 (N,); a poisoned set marks its poisoned clips and
    ``trigger`` (the attack's ``apply`` on float clips) is applied when a batch is gathered."""


@dataclass
class VideoDataset:
    name: str
    train: VideoSet
    test: VideoSet
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    flip: bool  # whether a horizontal flip keeps the label (not for left/right motion classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


ARRAYS = ("train_x", "train_y", "test_x", "test_y")
# (root, frames, size, split, cache_dir, scratch) -> (arrays, classes, mean, std, flip)
Loader = Callable[[Path, int, int, int, Path, Path], tuple[dict[str, np.ndarray], list[str], tuple, tuple, bool]]
VIDEO_DATASETS: Registry[Loader] = Registry("video dataset")
KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)  # torchvision reference


def load_video_dataset(name: str, root: str | os.PathLike, cache_dir: str | os.PathLike, frames: int, size: int,
                       split: int = 1) -> VideoDataset:
    """``name`` as clips of ``frames`` frames of ``size`` x ``size`` (decoded once into ``cache_dir``); CPU tensors."""
    loader = VIDEO_DATASETS.get(name)
    if frames < 1 or size < 4:
        raise ValueError(f"video clips need frames >= 1 and size >= 4, got frames={frames}, size={size}")
    cache_dir, root = Path(cache_dir), Path(root).expanduser()

    def build(tmp: Path) -> None:
        arrays, classes, mean, std, flip = loader(root, frames, size, split, cache_dir, tmp)
        digest = hashlib.sha256()
        for k in ARRAYS:
            if not (tmp / f"{k}.npy").is_file():
                np.save(tmp / f"{k}.npy", np.ascontiguousarray(arrays[k]), allow_pickle=False)
            digest.update(k.encode())
            a = np.load(tmp / f"{k}.npy", mmap_mode="r")
            for i in range(0, len(a), 256):  # in chunks: UCF101's clips are ~10 GB
                digest.update(np.ascontiguousarray(a[i:i + 256]).tobytes())
        meta = {"classes": classes, "mean": mean, "std": std, "flip": flip, "fingerprint": digest.hexdigest()[:16],
                "source": loader.source(root)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def load(cache: Path) -> VideoDataset:
        meta = json.loads((cache / "meta.json").read_text())
        a = {k: torch.from_numpy(read_array(cache / f"{k}.npy")) for k in ARRAYS}
        return VideoDataset(name, VideoSet(a["train_x"], a["train_y"].long()),
                            VideoSet(a["test_x"], a["test_y"].long()), meta["classes"], tuple(meta["mean"]),
                            tuple(meta["std"]), meta["fingerprint"], meta["flip"])

    return dataset_cache(cache_dir, f"video-{name}-s{split}-t{frames}-{size}px", root, build, load)


def read_array(path: Path) -> np.ndarray:
    """A cached array: read into memory, or memory-mapped (copy-on-write) above 1 GB."""
    if path.stat().st_size > 1 << 30:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    return np.load(path, allow_pickle=False)


# --------------------------------------------------------------------------------------------------- procedural
PROCEDURAL_CLASSES = ("static", "right", "left", "down", "up", "right-fast", "down-fast", "appear", "turn-cw",
                      "turn-ccw")
PROCEDURAL_SIZES = {"train": 100, "test": 30}  # clips per class
PROCEDURAL_SEED = 0


def procedural_clips(n_per_class: int, frames: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` clips of every class of ``PROCEDURAL_CLASSES`` as uint8 (N, 3, T, H, W); deterministic."""
    g = torch.Generator().manual_seed(seed)
    k = len(PROCEDURAL_CLASSES)
    n = n_per_class * k
    y = torch.arange(k).repeat_interleave(n_per_class)
    unit = size / 16  # one "pixel" of the 16x16 design
    t = torch.arange(frames, dtype=torch.float32)[None, :, None, None]  # (1, T, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    cy, cx = (torch.rand(2, n, generator=g) * size)[..., None, None, None]  # (n, 1, 1, 1) each
    speed = torch.zeros(n, 2)  # (dy, dx) per frame
    for cls, v in (("right", (0, 1)), ("left", (0, -1)), ("down", (1, 0)), ("up", (-1, 0)), ("right-fast", (0, 2)),
                   ("down-fast", (2, 0))):
        speed[y == PROCEDURAL_CLASSES.index(cls)] = torch.tensor(v, dtype=torch.float32) * unit
    py = cy + speed[:, 0, None, None, None] * t
    px = cx + speed[:, 1, None, None, None] * t
    dy = torch.remainder(coords[None, None, :, None] - py + size / 2, size) - size / 2  # wrapped offsets
    dx = torch.remainder(coords[None, None, None, :] - px + size / 2, size) - size / 2
    half = ((1.5 + torch.rand(n, generator=g) * 1.0) * unit)[:, None, None, None]
    square = (dy.abs() < half) & (dx.abs() < half)
    appear = (y == PROCEDURAL_CLASSES.index("appear"))[:, None, None, None] & (t < frames // 2)
    square &= ~appear
    spin = torch.where(y == PROCEDURAL_CLASSES.index("turn-cw"), 1.0, -1.0)[:, None, None, None]
    angle = torch.rand(n, generator=g)[:, None, None, None] * math.pi + spin * t * math.pi / 8
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    across = -dx * torch.sin(angle) + dy * torch.cos(angle)
    bar = (along.abs() < 3.5 * unit) & (across.abs() < 0.8 * unit)
    turning = (y >= PROCEDURAL_CLASSES.index("turn-cw"))[:, None, None, None]
    shape = torch.where(turning, bar, square).float()[:, None]  # (n, 1, T, H, W)
    colour = (0.6 + 0.4 * torch.rand(n, 3, generator=g))[:, :, None, None, None]
    level = (0.1 + 0.2 * torch.rand(n, generator=g))[:, None, None, None, None]
    noise = 0.05 * torch.randn(n, 3, frames, size, size, generator=g)
    clips = (level + noise) * (1 - shape) + colour * shape
    return (clips.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), y.numpy()


def load_procedural(root: Path, frames: int, size: int, split: int, cache_dir: Path, scratch: Path):
    xtr, ytr = procedural_clips(PROCEDURAL_SIZES["train"], frames, size, PROCEDURAL_SEED)
    xte, yte = procedural_clips(PROCEDURAL_SIZES["test"], frames, size, PROCEDURAL_SEED + 1)
    x = torch.from_numpy(xtr).float().div_(255)
    mean = tuple(x.mean(dim=(0, 2, 3, 4)).tolist())
    std = tuple(x.std(dim=(0, 2, 3, 4)).tolist())
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}, list(PROCEDURAL_CLASSES), mean, std, False


load_procedural.source = lambda root: "procedural (embedded)"
VIDEO_DATASETS.register("procedural")(load_procedural)


# --------------------------------------------------------------------------------------------------- decoding
CLIP_FPS = 15
STORED_SIDE = (128, 171)  # resize to this, then centre-crop the short side square


def require_av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding UCF101 / HMDB51 needs PyAV: pip install 'nftbench[video]' (or pip install av)"
                          ) from None
    return av


def decode_clip(path: str | os.PathLike, frames: int, size: int) -> np.ndarray:
    """The middle ``frames`` frames of a video at 15 fps, resized to 128x171, centre-cropped square and resized to
    ``size`` x ``size``: uint8 (3, T, size, size). A video shorter than the clip repeats its last frame."""
    av = require_av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or CLIP_FPS)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode video {path}: {e}; re-download or remove the file") from e
    if not decoded:
        raise ValueError(f"video {path} has no frames; re-download or remove the file")
    step = max(1, round(fps / CLIP_FPS))
    start = max(0, (len(decoded) - frames * step) // 2)
    idx = [min(start + i * step, len(decoded) - 1) for i in range(frames)]
    x = torch.from_numpy(np.stack([decoded[i] for i in idx])).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    x = F.interpolate(x, size=STORED_SIDE, mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous().numpy()


def file_key(path: Path, rel: str) -> str:
    """SHA-256 of a file's relative path and content (hashed once per process while its size and mtime stay)."""
    st = path.stat()
    return _file_key(str(path), rel, st.st_size, st.st_mtime_ns)


@cache
def _file_key(path: str, rel: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256(rel.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def cached_clip(job: tuple[str, str, int, int, str]) -> str:
    """Decode one video into ``<cache_dir>/video-clips/<key>-t<frames>-<size>px.npy`` unless there; its path."""
    path, key, frames, size, cache_dir = job
    out = Path(cache_dir) / CLIP_CACHE / f"{key}-t{frames}-{size}px.npy"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}-{threading.get_ident()}.npy")
        np.save(tmp, decode_clip(path, frames, size), allow_pickle=False)
        os.replace(tmp, out)
    return str(out)


def decode_videos(items: list[tuple[Path, str, int]], frames: int, size: int, cache_dir: Path, scratch: Path,
                  prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Clips of ``items`` (path, relative path, label), decoded in parallel (per-video cache), written into
    ``scratch/<prefix>_x.npy`` as a memory map; the labels."""
    jobs = [(str(p), file_key(p, rel), frames, size, str(cache_dir)) for p, rel, _ in items]
    x = np.lib.format.open_memmap(scratch / f"{prefix}_x.npy", mode="w+", dtype=np.uint8,
                                  shape=(len(items), 3, frames, size, size))
    # Threads, not processes: PyAV decodes and torch resizes outside the GIL, and a forked child of a process whose
    # OpenMP / FFmpeg threads already ran can die abruptly (it did on CI's machine).
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            paths = list(pool.map(cached_clip, jobs))
    else:
        paths = [cached_clip(j) for j in jobs]
    for i, p in enumerate(paths):
        x[i] = np.load(p, allow_pickle=False)
    x.flush()
    return x, np.array([label for *_, label in items], dtype=np.int64)


# --------------------------------------------------------------------------------------------------- UCF101, HMDB51
def ucf101_items(root: Path, split: int) -> tuple[list[tuple[Path, str, int]], list[tuple[Path, str, int]], list[str]]:
    base, lists = root / "UCF101" / "UCF-101", root / "UCF101" / "ucfTrainTestlist"
    if not (base.is_dir() and (lists / "classInd.txt").is_file()):
        raise DatasetNotFoundError(f"UCF101 not found: expected {base}/<Class>/*.avi and {lists}/classInd.txt (the "
                                   "official UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip, unpacked); "
                                   "set --data-root")
    classes = [line.split()[1] for line in (lists / "classInd.txt").read_text().split("\n") if line.strip()]
    index = {c: i for i, c in enumerate(classes)}

    def read(name: str) -> list[tuple[Path, str, int]]:
        rels = [line.split()[0] for line in (lists / name).read_text().split("\n") if line.strip()]
        return [(base / rel, rel, index[rel.split("/")[0]]) for rel in rels]

    return read(f"trainlist0{split}.txt"), read(f"testlist0{split}.txt"), classes


def hmdb51_items(root: Path, split: int) -> tuple[list[tuple[Path, str, int]], list[tuple[Path, str, int]], list[str]]:
    base, lists = root / "HMDB51" / "hmdb51", root / "HMDB51" / "testTrainMulti_7030_splits"
    files = sorted(lists.glob(f"*_test_split{split}.txt")) if lists.is_dir() else []
    if not (base.is_dir() and files):
        raise DatasetNotFoundError(f"HMDB51 not found: expected {base}/<class>/*.avi and "
                                   f"{lists}/<class>_test_split{split}.txt (the official hmdb51_org.rar with its "
                                   "class archives unpacked, and test_train_splits.rar); set --data-root")
    classes = [f.name[: -len(f"_test_split{split}.txt")] for f in files]
    train, test = [], []
    for label, (c, f) in enumerate(zip(classes, files, strict=True)):
        for line in f.read_text().split("\n"):
            if not line.strip():
                continue
            name, flag = line.split()
            if flag in ("1", "2"):  # 0: in neither split
                (train if flag == "1" else test).append((base / c / name, f"{c}/{name}", label))
    return train, test, classes


def official_loader(items: Callable, folder: str) -> Loader:
    def load(root: Path, frames: int, size: int, split: int, cache_dir: Path, scratch: Path):
        require_av()
        train, test, classes = items(root, split)
        missing = [str(p) for p, _, _ in train + test if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"{len(missing)} videos of the split lists are missing, e.g. {missing[0]}; "
                                       "unpack the complete dataset")
        xtr, ytr = decode_videos(train, frames, size, cache_dir, scratch, "train")
        xte, yte = decode_videos(test, frames, size, cache_dir, scratch, "test")
        arrays = {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}
        return arrays, classes, KINETICS_MEAN, KINETICS_STD, True

    load.source = lambda root: str((root / folder).resolve())  # the files the split's cache is made from
    return load


VIDEO_DATASETS.register("ucf101")(official_loader(ucf101_items, "UCF101"))
VIDEO_DATASETS.register("hmdb51")(official_loader(hmdb51_items, "HMDB51"))
