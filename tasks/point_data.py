"""Point-cloud datasets: ModelNet40 / ModelNet10 from a local copy, and a procedural set for offline runs.

Every dataset becomes float32 arrays (N, P, 3) of P points per cloud, normalised to the unit sphere (centroid
at the origin, farthest point at distance 1, as PointNet++'s ``pc_normalize``), points in random order (they are
i.i.d. samples of the surface), saved as ``.npy`` under ``<cache_dir>/datasets/<name>-p<P>-<key>/``
(``tasks.data_cache``) and loaded with ``allow_pickle=False``. Nothing is downloaded unless the caller passes
``download=True``.

- ``modelnet40`` / ``modelnet10`` (Wu et al., "3D ShapeNets", CVPR 2015): the official layout
  ``ModelNet40/<class>/{train,test}/*.off`` under the data root (classes sorted by name, 40 / 10 of them), or
  torch-geometric's ``ModelNet40/raw/<class>/...``. Meshes are read with torch-geometric's ``read_off`` and P
  points sampled with its ``SamplePoints`` (area-weighted, uniform on the surface), seeded per file. Not its
  ``ModelNet`` dataset class: that stores and reloads its processed meshes as pickles (``torch.save``), and the
  suite never unpickles files it finds in a user's folder; nor ``NormalizeScale`` (a unit cube): clouds go to
  the unit sphere as PointNet++ and the procedural set, which the triggers' sizes assume. The archive is
  downloaded (only with ``download=True``) from torch-geometric's URL with torchvision's extractor.
- ``procedural`` (the embedded default; no files): ten shape families, sphere, cube (box), cylinder, cone,
  torus, pyramid, ellipsoid, capsule, disc and helix (spring), sampled uniformly on their surfaces, with
  random proportions per sample (anisotropic only within ranges that keep the families apart, e.g. a
  cylinder stays taller than wide, an ellipsoid stays clearly non-spherical), a random rotation about the up
  axis (z) plus a small tilt (up to 5 degrees about x and y), normalised to the unit sphere, then Gaussian
  noise (sigma 0.01). 150 training and 50 test clouds per family, deterministic from a fixed seed. Objects
  stand upright as in ModelNet, so an orientation trigger (PointBA-O) is meaningful; the sphere is class 0
  (the default attack target), the only family a rotation leaves unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import LabelledTensors, Registry
from tasks.data_cache import dataset_cache


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where it was looked for and how to get it."""


class PointSet(LabelledTensors):
    """Clouds as float32 (N, P, 3) and labels as int64 (N,), on CPU or a device.

    As ``ImageSet``: a poisoned training set keeps its clean clouds, marks the poisoned ones (``poisoned``, bool
    (N,)), holds the attacker's labels, and ``trigger`` (the attack's ``apply`` on (n, P, 3)) is applied when a
    batch is gathered.
    """


@dataclass
class PointDataset:
    name: str
    train: PointSet
    test: PointSet
    classes: list[str]
    fingerprint: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_points(self) -> int:
        return int(self.train.x.shape[1])


ARRAYS = ("train_x", "train_y", "test_x", "test_y")
Loader = Callable[[Path, bool, int, Path], tuple[dict[str, np.ndarray], list[str], str]]
POINTCLOUD_DATASETS: Registry[Loader] = Registry("point cloud dataset")


def load_point_dataset(name: str, root: str | os.PathLike, cache_dir: str | os.PathLike, download: bool = False,
                       num_points: int = 1024) -> PointDataset:
    """Load ``name`` with ``num_points`` points per cloud (sampling once into ``cache_dir``); CPU tensors."""
    loader = POINTCLOUD_DATASETS.get(name)
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")

    def load(cache: Path) -> PointDataset:
        meta = json.loads((cache / "meta.json").read_text())
        a = {k: torch.from_numpy(np.load(cache / f"{k}.npy", allow_pickle=False)) for k in ARRAYS}
        return PointDataset(name=name, train=PointSet(a["train_x"].float(), a["train_y"].long()),
                            test=PointSet(a["test_x"].float(), a["test_y"].long()), classes=meta["classes"],
                            fingerprint=meta["fingerprint"], source=meta["source"])

    return dataset_cache(cache_dir, f"{name}-p{num_points}", root, lambda tmp: write_cache(
        tmp, *loader(Path(root).expanduser(), download, num_points, tmp)), load)


def write_cache(folder: Path, arrays: dict[str, np.ndarray], classes: list[str], source: str) -> None:
    digest = hashlib.sha256()
    for k in ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        if k.endswith("_x") and (a.dtype != np.float32 or a.ndim != 3 or a.shape[2] != 3):
            raise ValueError(f"{k} must be float32 (N, P, 3), got {a.dtype} {a.shape}")
        np.save(folder / f"{k}.npy", a, allow_pickle=False)
        digest.update(k.encode())
        digest.update(a.tobytes())
    meta = {"classes": classes, "fingerprint": digest.hexdigest()[:16], "source": source,
            "sizes": {k: len(arrays[k]) for k in ARRAYS}, "num_points": int(arrays["train_x"].shape[1])}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def normalize_unit_sphere(x: np.ndarray | Tensor):
    """Centroid to the origin, farthest point at distance 1 (per cloud; works on (P, 3) or (N, P, 3))."""
    if isinstance(x, Tensor):
        x = x - x.mean(dim=-2, keepdim=True)
        return x / x.norm(dim=-1, keepdim=True).amax(dim=-2, keepdim=True).clamp_min(1e-12)
    x = x - x.mean(axis=-2, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True).max(axis=-2, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------- OFF meshes
def require_torch_geometric():
    try:
        import torch_geometric  # noqa: F401
    except ImportError as e:
        raise ImportError("reading ModelNet meshes needs torch-geometric: pip install 'nftbench[pointcloud]' "
                          "(or pip install torch-geometric)") from e


def mesh_to_points(path: str, num_points: int, seed: int) -> np.ndarray:
    """One mesh -> (P, 3) float32: torch-geometric's ``read_off`` and ``SamplePoints`` (area-weighted, uniform on
    the surface), seeded per file; then centred and scaled to the unit sphere."""
    from torch_geometric.io import read_off
    from torch_geometric.transforms import SamplePoints

    try:
        mesh = read_off(path)
    except (ValueError, IndexError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable OFF mesh ({type(e).__name__}: {e}); re-extract the dataset") from e
    if mesh.face is None or mesh.face.numel() == 0 or mesh.pos.numel() == 0:
        raise ValueError(f"{path}: mesh has no triangles or quads to sample; re-extract the dataset")
    if int(mesh.face.max()) >= len(mesh.pos):
        raise ValueError(f"{path}: face index out of range (mesh has {len(mesh.pos)} vertices)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pos = SamplePoints(num_points)(mesh).pos
    if not torch.isfinite(pos).all():
        raise ValueError(f"{path}: mesh has no surface area (degenerate faces); re-extract the dataset")
    return normalize_unit_sphere(pos.double().numpy()).astype(np.float32)


def _mesh_job(args: tuple[str, int, int]) -> np.ndarray:
    return mesh_to_points(*args)


def meshes_to_points(paths: list[str], num_points: int, seed: int) -> np.ndarray:
    """Read and sample every mesh (in parallel processes for large lists); (N, P, 3) float32."""
    if not paths:
        raise DatasetNotFoundError("no .off files found")
    require_torch_geometric()
    jobs = [(p, num_points, seed * 1_000_003 + i) for i, p in enumerate(paths)]
    workers = min(len(paths) // 200 + 1, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            clouds = list(pool.map(_mesh_job, jobs, chunksize=32))
    else:
        clouds = [_mesh_job(j) for j in jobs]
    return np.stack(clouds)


def modelnet_url(version: str) -> str:
    """torch-geometric's download URL of ModelNet10/40 (it tracks moves of the archive)."""
    require_torch_geometric()
    from torch_geometric.datasets import ModelNet

    return ModelNet.urls[version]


def _is_modelnet(d: Path) -> bool:
    return d.is_dir() and any((c / "train").is_dir() for c in d.iterdir() if c.is_dir())


def _load_modelnet(version: str, root: Path, download: bool, num_points: int, scratch: Path):
    name = f"ModelNet{version}"
    candidates = [root / name, root / name.lower(), root / name / "raw", root]
    if download and not any(_is_modelnet(d) for d in candidates):
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(modelnet_url(version), str(root))
    base = next((d for d in candidates if _is_modelnet(d)), None)
    if base is None:
        raise DatasetNotFoundError(
            f"{name} not found. Looked in: {', '.join(str(d) for d in candidates)} for <class>/train/*.off. "
            f"Unzip {name}.zip (the official layout {name}/<class>/{{train,test}}/*.off) under --data-root "
            f"{root}, or pass --download to fetch it."
        )
    classes = sorted(c.name for c in base.iterdir() if (c / "train").is_dir())
    arrays = {}
    for s, split in enumerate(("train", "test")):
        paths, labels = [], []
        for i, c in enumerate(classes):
            files = sorted((base / c / split).glob("*.off")) if (base / c / split).is_dir() else []
            paths += [str(f) for f in files]
            labels += [i] * len(files)
        if not paths:
            raise DatasetNotFoundError(f"{name} at {base} has no {split}/*.off files")
        arrays[f"{split}_x"] = meshes_to_points(paths, num_points, seed=s)
        arrays[f"{split}_y"] = np.asarray(labels, dtype=np.int64)
    return arrays, classes, str(base)


@POINTCLOUD_DATASETS.register("modelnet40")
def load_modelnet40(root: Path, download: bool, num_points: int, scratch: Path):
    """ModelNet40 (Wu et al., CVPR 2015): 9,843 train / 2,468 test meshes of 40 classes."""
    return _load_modelnet("40", root, download, num_points, scratch)


@POINTCLOUD_DATASETS.register("modelnet10")
def load_modelnet10(root: Path, download: bool, num_points: int, scratch: Path):
    """ModelNet10 (Wu et al., CVPR 2015): 3,991 train / 908 test meshes of 10 classes."""
    return _load_modelnet("10", root, download, num_points, scratch)


# --------------------------------------------------------------------------------------------- procedural
def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _unit(g: torch.Generator, n: int, p: int) -> Tensor:
    d = torch.randn(n, p, 3, generator=g, dtype=torch.float64)
    return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pick(g: torch.Generator, areas: Tensor, p: int) -> Tensor:
    """A part index per point, with probability proportional to the parts' areas (n, parts) -> (n, p)."""
    return torch.multinomial(areas.float(), p, replacement=True, generator=g)


def _disc(g: torch.Generator, n: int, p: int) -> tuple[Tensor, Tensor]:
    """Uniform on the unit disc: (x, y), each (n, p)."""
    r, t = _u(g, n, p).sqrt(), _u(g, n, p, hi=2 * math.pi)
    return r * t.cos(), r * t.sin()


def _accept(g: torch.Generator, candidates: Tensor, weight: Tensor, p: int) -> Tensor:
    """Rejection sampling for densities known up to a factor: keep each candidate with probability ``weight``
    (in [0, 1]) and return ``p`` kept ones per cloud (4x more candidates than points are drawn, so running out
    is practically impossible; if it happened, rejected candidates would fill the gap)."""
    keep = _u(g, *weight.shape) < weight
    key = torch.where(keep, _u(g, *weight.shape), 1 + _u(g, *weight.shape))
    idx = key.argsort(dim=1)[:, :p]
    return torch.gather(candidates, 1, idx[..., None].expand(-1, -1, 3))


def _triangles(g: torch.Generator, tri: Tensor, p: int) -> Tensor:
    """Uniform on a triangle soup, batched: tri (n, T, 3, 3) -> (n, p, 3)."""
    a, b, c = tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]
    area = 0.5 * torch.linalg.cross(b - a, c - a).norm(dim=-1)
    t = _pick(g, area, p)[..., None, None].expand(-1, -1, 3, 3)
    a, b, c = torch.gather(tri, 1, t).unbind(2)
    u, v = _u(g, *t.shape[:2], 1), _u(g, *t.shape[:2], 1)
    flip = u + v > 1
    u, v = torch.where(flip, 1 - u, u), torch.where(flip, 1 - v, v)
    return a + u * (b - a) + v * (c - a)


def sphere(g: torch.Generator, n: int, p: int) -> Tensor:
    return _unit(g, n, p)


def cube(g: torch.Generator, n: int, p: int) -> Tensor:
    """A box with half-extents in [0.75, 1.25] (a near-cube): faces chosen by area."""
    a = _u(g, n, 1, 3, lo=0.75, hi=1.25)
    areas = torch.stack([a[:, 0, 1] * a[:, 0, 2], a[:, 0, 0] * a[:, 0, 2], a[:, 0, 0] * a[:, 0, 1]], dim=1)
    axis = _pick(g, areas, p)  # the axis the point's face is normal to
    pts = (2 * _u(g, n, p, 3) - 1) * a
    sign = torch.where(_u(g, n, p) < 0.5, -1.0, 1.0).double()
    face = torch.nn.functional.one_hot(axis, 3).bool()
    return torch.where(face, sign[..., None] * a.expand(-1, p, -1), pts)


def cylinder(g: torch.Generator, n: int, p: int) -> Tensor:
    """Radius 1, height in [1.5, 3] (taller than wide, unlike the disc): side and both caps by area."""
    h = _u(g, n, 1, lo=1.5, hi=3.0)
    part = _pick(g, torch.cat([2 * math.pi * h, 2 * math.pi * torch.ones_like(h)], dim=1), p)
    t = _u(g, n, p, hi=2 * math.pi)
    side = torch.stack([t.cos(), t.sin(), (_u(g, n, p) - 0.5) * h], dim=-1)
    dx, dy = _disc(g, n, p)
    cap = torch.stack([dx, dy, torch.where(_u(g, n, p) < 0.5, -0.5, 0.5).double() * h], dim=-1)
    return torch.where((part == 0)[..., None], side, cap)


def cone(g: torch.Generator, n: int, p: int) -> Tensor:
    """Base radius 1, height in [1.2, 2.5]: lateral surface (density grows linearly from the apex) and base."""
    h = _u(g, n, 1, lo=1.2, hi=2.5)
    slant = (1 + h**2).sqrt()
    part = _pick(g, torch.cat([math.pi * slant, math.pi * torch.ones_like(h)], dim=1), p)
    s, t = _u(g, n, p).sqrt(), _u(g, n, p, hi=2 * math.pi)  # s: distance from the apex, as a fraction
    side = torch.stack([s * t.cos(), s * t.sin(), h / 2 - s * h], dim=-1)
    dx, dy = _disc(g, n, p)
    base = torch.stack([dx, dy, -h / 2 * torch.ones_like(dx)], dim=-1)
    return torch.where((part == 0)[..., None], side, base)


def torus(g: torch.Generator, n: int, p: int) -> Tensor:
    """Major radius 1, tube radius in [0.2, 0.4], uniform on the surface (density ~ 1 + r cos(phi))."""
    r = _u(g, n, 1, lo=0.2, hi=0.4)
    m = 4 * p
    t, phi = _u(g, n, m, hi=2 * math.pi), _u(g, n, m, hi=2 * math.pi)
    ring = 1 + r * phi.cos()
    pts = torch.stack([ring * t.cos(), ring * t.sin(), r * phi.sin()], dim=-1)
    return _accept(g, pts, ring / (1 + r), p)


def pyramid(g: torch.Generator, n: int, p: int) -> Tensor:
    """Square base of half-side 1, apex at height in [1.2, 2.2]: four triangles and the base, by area."""
    h = _u(g, n, lo=1.2, hi=2.2)
    z0 = -h / 2
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    base = torch.cat([corners.expand(n, 4, 2), z0[:, None, None].expand(n, 4, 1)], dim=-1)  # (n, 4, 3)
    apex = torch.stack([torch.zeros_like(h), torch.zeros_like(h), h / 2], dim=-1)[:, None]  # (n, 1, 3)
    sides = [torch.stack([base[:, i], base[:, (i + 1) % 4], apex[:, 0]], dim=1) for i in range(4)]
    bottom = [torch.stack([base[:, 0], base[:, 1], base[:, 2]], dim=1),
              torch.stack([base[:, 0], base[:, 2], base[:, 3]], dim=1)]
    return _triangles(g, torch.stack(sides + bottom, dim=1), p)


def ellipsoid(g: torch.Generator, n: int, p: int) -> Tensor:
    """Semi-axes (1, a, b) with a, b in [0.35, 0.65] (clearly not a sphere), uniform on the surface: a direction
    u on the sphere maps to (u1, a u2, b u3) and is kept with probability ~ sqrt(u1^2 + (u2/a)^2 + (u3/b)^2)."""
    axes = torch.cat([torch.ones(n, 1, 1, dtype=torch.float64), _u(g, n, 1, 2, lo=0.35, hi=0.65)], dim=-1)
    u = _unit(g, n, 4 * p)
    w = (u / axes).norm(dim=-1)
    return _accept(g, u * axes, w / (1 / axes.amin(dim=-1)), p)


def capsule(g: torch.Generator, n: int, p: int) -> Tensor:
    """A cylinder of radius 1 and height in [1, 2.5] closed by two hemispheres, by area."""
    h = _u(g, n, 1, lo=1.0, hi=2.5)
    part = _pick(g, torch.cat([2 * math.pi * h, 4 * math.pi * torch.ones_like(h)], dim=1), p)
    t = _u(g, n, p, hi=2 * math.pi)
    side = torch.stack([t.cos(), t.sin(), (_u(g, n, p) - 0.5) * h], dim=-1)
    cap = _unit(g, n, p)
    cap = cap + torch.stack([torch.zeros_like(t), torch.zeros_like(t), torch.sign(cap[..., 2]) * h / 2], dim=-1)
    return torch.where((part == 0)[..., None], side, cap)


def disc(g: torch.Generator, n: int, p: int) -> Tensor:
    """A flat disc (a plane patch) of radius 1, stretched along x by a factor in [1, 1.3]."""
    dx, dy = _disc(g, n, p)
    return torch.stack([dx * _u(g, n, 1, lo=1.0, hi=1.3), dy, torch.zeros_like(dx)], dim=-1)


def helix(g: torch.Generator, n: int, p: int) -> Tensor:
    """A spring: a tube of radius 0.1 around a helix of radius 1 with 2-4 turns and a pitch of 0.5-0.9 per turn."""
    turns, pitch = _u(g, n, 1, lo=2.0, hi=4.0), _u(g, n, 1, lo=0.5, hi=0.9)
    t = _u(g, n, p) * turns * 2 * math.pi  # constant speed: uniform in t is uniform in arc length
    c = pitch / (2 * math.pi)
    centre = torch.stack([t.cos(), t.sin(), c * t - c * turns * math.pi], dim=-1)
    tangent = torch.stack([-t.sin(), t.cos(), c.expand_as(t)], dim=-1)
    tangent = tangent / tangent.norm(dim=-1, keepdim=True)
    normal = torch.stack([-t.cos(), -t.sin(), torch.zeros_like(t)], dim=-1)
    binormal = torch.linalg.cross(tangent, normal)
    psi = _u(g, n, p, 1, hi=2 * math.pi)
    return centre + 0.1 * (psi.cos() * normal + psi.sin() * binormal)


PROCEDURAL_FAMILIES: dict[str, Callable[[torch.Generator, int, int], Tensor]] = {
    "sphere": sphere, "cube": cube, "cylinder": cylinder, "cone": cone, "torus": torus, "pyramid": pyramid,
    "ellipsoid": ellipsoid, "capsule": capsule, "disc": disc, "helix": helix,
}
PROCEDURAL_SIZES = {"train": 150, "test": 50}  # clouds per family
PROCEDURAL_SEED = 0
PROCEDURAL_NOISE = 0.01
PROCEDURAL_TILT_DEG = 5.0


def rotation_matrices(angles: Tensor) -> Tensor:
    """Rotation matrices R = Rz @ Ry @ Rx for angles (..., 3) = (about x, about y, about z) in radians."""
    ax, ay, az = angles.unbind(-1)
    one, zero = torch.ones_like(ax), torch.zeros_like(ax)
    rx = torch.stack([one, zero, zero, zero, ax.cos(), -ax.sin(), zero, ax.sin(), ax.cos()], -1)
    ry = torch.stack([ay.cos(), zero, ay.sin(), zero, one, zero, -ay.sin(), zero, ay.cos()], -1)
    rz = torch.stack([az.cos(), -az.sin(), zero, az.sin(), az.cos(), zero, zero, zero, one], -1)
    shape = (*angles.shape[:-1], 3, 3)
    return rz.view(shape) @ ry.view(shape) @ rx.view(shape)


def procedural_clouds(n_per_class: int, num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` clouds of every family (class order of ``PROCEDURAL_FAMILIES``), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    tilt = math.radians(PROCEDURAL_TILT_DEG)
    for label, family in enumerate(PROCEDURAL_FAMILIES.values()):
        pts = family(g, n_per_class, num_points)
        angles = torch.stack([_u(g, n_per_class, lo=-tilt, hi=tilt), _u(g, n_per_class, lo=-tilt, hi=tilt),
                              _u(g, n_per_class, hi=2 * math.pi)], dim=-1)
        pts = pts @ rotation_matrices(angles).transpose(1, 2)
        pts = normalize_unit_sphere(pts) + PROCEDURAL_NOISE * torch.randn(pts.shape, generator=g, dtype=pts.dtype)
        xs.append(pts.float())
        ys.append(torch.full((n_per_class,), label, dtype=torch.int64))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


@POINTCLOUD_DATASETS.register("procedural")
def load_procedural(root: Path, download: bool, num_points: int, scratch: Path):
    """Ten procedural shape families (see the module docstring); needs no files, so tests and the CPU preset
    run offline."""
    xtr, ytr = procedural_clouds(PROCEDURAL_SIZES["train"], num_points, PROCEDURAL_SEED)
    xte, yte = procedural_clouds(PROCEDURAL_SIZES["test"], num_points, PROCEDURAL_SEED + 1)
    arrays = {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}
    return arrays, list(PROCEDURAL_FAMILIES), "procedural (tasks/point_data.py)"
