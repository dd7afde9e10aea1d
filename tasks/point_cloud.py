"""3D point-cloud classification task adapter: PointNet on ModelNet40 / ModelNet10 or a procedural set.

NFT's paper evaluates point clouds with PCBA / PointBA victims on PointNet and ModelNet40 (Sec. 4); this adapter
lets NFT and every baseline run on them unchanged, through the task protocol only.

- Data (``tasks/point_data.py``): float32 clouds (N, P, 3), sampled once from the meshes and cached, held on
  the device whole; P = ``num_points``, by default 1024 at the paper scale (PointNet's ModelNet setting) and 256
  at the quick scale (CPU minutes). The trigger of poisoned clouds is applied when a batch is gathered, then the
  batch is augmented there, then transposed to the model's layout.
- Model input: coordinates as (N, 3, P) (channels first, for Conv1d shared MLPs).
- Augmentation (training batches; batched on the device from a seeded CPU generator), the standard PointNet /
  PointNet++ ones: anisotropic scale U(0.8, 1.25) per axis (PointNet++ ``random_scale_point_cloud`` draws one
  isotropic factor in the same range; DGCNN scales per axis), translation U(-0.1, 0.1) per axis (PointNet++
  ``shift_point_cloud``), jitter N(0, 0.01^2) clipped to +-0.05 per coordinate (PointNet ``jitter_point_cloud``),
  and with ``rotate_augment=True`` a uniform rotation about the up axis z (PointNet ``rotate_point_cloud``; off
  by default, as orientation triggers (PointBA-O) need a canonical orientation).
- Loss: cross-entropy, plus PointNet's feature-transform regulariser ``0.001 * ||I - A A^T||_F^2`` when the
  model has a feature T-Net (read with a forward hook, so the model's forward returns logits only).
- MixUp: RSMix (Lee, Lee, Kim, Kim, Kim, Jeong, Hong, "Regularization Strategy for Point Cloud via Rigidly
  Mixed Sample", CVPR 2021; authors' code ``dogyoonlee/RSMix``, ``rsmix_provider.py``, its k-NN variant), see
  :meth:`PointCloudTask.mixup_loss`; chosen over PointMixup (Chen et al., ECCV 2020) because it is exact and
  batched on the device: PointMixup interpolates along the optimal (EMD) one-to-one assignment between two
  clouds, an O(P^3) assignment problem per pair (``scipy.optimize.linear_sum_assignment``: 0.2 s for P = 1024 on
  the suite's CPU box, so ~26 s per NFT batch of 128 and ~7 h for NFT's 1,000 steps), which its authors
  approximate with a custom CUDA auction kernel; RSMix needs one distance row per cloud and a top-k.
- Perturbable input (I-BAU): the model's input (N, 3, P) itself, so a universal perturbation is a *per-point
  offset field* (3, P): point slot i of every cloud moves by delta[:, i]. Point order is random, so this is an
  offset per slot, not per surface location; it is the exact analogue of a per-pixel image perturbation for a
  set input, and needs no change to I-BAU.
- Evaluation: C-ACC on the clean test set; ASR / RA on triggered test clouds whose label is not the target
  (all-to-one), as the image task.
- Recipes: ``paper`` is PointNet's (Qi et al., CVPR 2017, supplementary: Adam lr 0.001, beta1 0.9, batch 32,
  250 epochs, learning rate halved every 20 epochs; the authors' TF ``train.py`` decays by 0.7 every 200k
  samples); ``quick`` is a CPU-minutes version (``pointnet-small``, 256 points, Adam 2e-3, batch 32, 12 epochs,
  halved every 5).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.precision import autocast, precision_identity
from tasks.base import (
    TASKS,
    Batch,
    CleanBudget,
    Task,
    TensorBatches,
    beta_sample,
    resolve_device,
    select_clean,
    select_poison_indices,
    stratified_split,
)
from tasks.point_data import PointDataset, PointSet, load_point_dataset, rotation_matrices
from tasks.point_models import POINTCLOUD_MODELS, feature_transform_regularizer

if TYPE_CHECKING:
    from attacks.base import Attack

DEFAULT_MODELS = {
    ("procedural", "quick"): "pointnet-small", ("procedural", "paper"): "pointnet",
    ("modelnet40", "quick"): "pointnet-small", ("modelnet40", "paper"): "pointnet",
    ("modelnet10", "quick"): "pointnet-small", ("modelnet10", "paper"): "pointnet",
}
RESERVE_FRACTION = {"procedural": 0.1}  # 150 of 1,500 clouds (15 per class); ModelNet40: 5% = 492 of 9,843
DEFAULT_RESERVE = 0.05
FEATURE_TRANSFORM_WEIGHT = 0.001  # PointNet's regulariser weight
DEFAULT_POINTS = {"quick": 256, "paper": 1024}  # points per cloud unless num_points is given

RECIPES: dict[str, dict[str, Any]] = {
    "quick": dict(epochs=12, batch_size=32, optimizer="adam", lr=2e-3, momentum=0.9, nesterov=False,
                  weight_decay=0.0, schedule="step", step_epochs=5, gamma=0.5, label_smoothing=0.0),
    "paper": dict(epochs=250, batch_size=32, optimizer="adam", lr=1e-3, momentum=0.9, nesterov=False,
                  weight_decay=0.0, schedule="step", step_epochs=20, gamma=0.5, label_smoothing=0.0),
}
DATASET_RECIPES: dict[tuple[str, str], dict[str, Any]] = {}

AUG_SCALE = (0.8, 1.25)
AUG_SHIFT = 0.1
AUG_JITTER, AUG_CLIP = 0.01, 0.05


@TASKS.register("pointcloud")
class PointCloudTask(TensorBatches, Task):
    """Point-cloud classification adapter (see the module docstring).

    ``reserve_fraction`` of the training set (stratified, fixed ``split_seed``) is the defender's reserve; the
    attacker trains on the rest, as in the image task.
    """

    eval_batch_size = 256

    name = "pointcloud"
    default_dataset = "procedural"
    default_attack = "pointba-i"

    def __init__(
        self, dataset: str = "procedural", model: str | None = None, scale: str = "quick",
        data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "runs",
        device: str = "auto", download: bool = False, num_points: int | None = None, rotate_augment: bool = False,
        reserve_fraction: float | None = None, split_seed: int = 0, amp: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if scale not in RECIPES:
            raise ValueError(f"scale must be one of {sorted(RECIPES)}, got {scale!r}")
        self.dataset_name, self.scale = dataset, scale
        self.model_name = model or DEFAULT_MODELS.get((dataset, scale), "pointnet-small")
        POINTCLOUD_MODELS.get(self.model_name)  # fail fast on an unknown model
        self.model_kwargs = dict(model_kwargs or {})
        self.num_points = int(num_points or DEFAULT_POINTS[scale])
        self.rotate_augment = bool(rotate_augment)
        self.device = resolve_device(device)
        self.amp = amp
        self.cache_dir = Path(cache_dir)
        root = data_root or os.environ.get("DATA_ROOT", "data")
        self.data: PointDataset = load_point_dataset(dataset, root, cache_dir, download, self.num_points)
        self.num_classes = self.data.num_classes
        self.reserve_fraction = reserve_fraction or RESERVE_FRACTION.get(dataset, DEFAULT_RESERVE)
        self.split_seed = split_seed
        self.attacker_idx, self.reserve_idx = stratified_split(self.data.train.y, self.reserve_fraction, split_seed)
        self.test = self.data.test.to(self.device)
        self._train_on_device = self.data.train.to(self.device)

    # --- description -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "task": self.name, "dataset": self.dataset_name, "model": self.model_name, "scale": self.scale,
            "model_kwargs": self.model_kwargs, "num_points": self.num_points, "rotate_augment": self.rotate_augment,
            "reserve_fraction": self.reserve_fraction, "split_seed": self.split_seed,
            "data_fingerprint": self.data.fingerprint,
        }

    def recipe(self) -> dict[str, Any]:
        return {**RECIPES[self.scale], **DATASET_RECIPES.get((self.dataset_name, self.scale), {})}

    # --- model and data ----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return POINTCLOUD_MODELS.get(self.model_name)(num_classes=self.num_classes, **self.model_kwargs).to(self.device)

    def split_sizes(self, split: PointSet) -> int:
        return len(split)

    def check_attack(self, attack: Attack | None) -> None:
        """Point-cloud attacks only; an attack that needs fitting (PCBA) is fitted (and cached) first."""
        if attack is None:
            return
        if getattr(attack, "modality", None) != "pointcloud":
            kind = getattr(attack, "modality", None) or "non-point-cloud"
            raise ValueError(f"attack {attack.name!r} is a {kind} attack; the pointcloud task takes point-cloud "
                             "attacks (pointba-i, pointba-o, pcba; see `nftbench list`)")
        if getattr(attack, "needs_fit", False) and getattr(attack, "center_", None) is None:
            self.fit_attack(attack)

    def attacker_train(self, attack: Attack | None, seed: int) -> tuple[PointSet, Tensor]:
        """The attacker's training set, poisoned by ``attack`` (exact, seeded); and the poisoned indices."""
        self.check_attack(attack)
        train = self._train_on_device.subset(self.attacker_idx)
        if attack is None or attack.poison_rate == 0:
            return train, torch.empty(0, dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        idx = select_poison_indices(train.y, attack, g)
        y = train.y.clone()
        y[idx.to(y.device)] = attack.poison_label(y[idx.to(y.device)], self.num_classes)
        poisoned = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        poisoned[idx.to(y.device)] = True
        return PointSet(train.x, y, poisoned, attack.apply), idx

    def clean_split(self, budget: CleanBudget, seed: int) -> PointSet:
        """``fraction`` of the full training set, or ``per_class`` per class, from the defender's reserve."""
        chosen = select_clean(self.data.train.y, self.reserve_idx, self.num_classes, budget, seed)
        return self._train_on_device.subset(chosen)

    # --- batches -------------------------------------------------------------------------------------
    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Anisotropic scale, translation, clipped jitter (and optional rotation about z), batched; x (n, P, 3)."""
        n = x.shape[0]
        lo, hi = AUG_SCALE
        scale = (lo + (hi - lo) * torch.rand(n, 1, 3, generator=generator)).to(x)
        shift = ((torch.rand(n, 1, 3, generator=generator) * 2 - 1) * AUG_SHIFT).to(x)
        jitter = (torch.randn(x.shape, generator=generator) * AUG_JITTER).clamp_(-AUG_CLIP, AUG_CLIP).to(x)
        if self.rotate_augment:
            angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
            zeros = torch.zeros_like(angle)
            rot = rotation_matrices(torch.stack([zeros, zeros, angle], dim=-1)).to(x)
            x = x @ rot.transpose(1, 2)
        return x * scale + shift + jitter

    def make_batch(self, split: PointSet, idx: Tensor, augment: bool, generator: torch.Generator | None) -> Batch:
        x = split.x[idx.to(split.x.device)].to(self.device, non_blocking=True)
        y = split.y[idx.to(split.y.device)].to(self.device, non_blocking=True)
        if split.poisoned is not None:
            rows = split.poisoned[idx.to(split.poisoned.device)].to(self.device)
            if rows.any():  # trigger first (the attacker's released cloud), then the training augmentation
                x[rows] = split.trigger(x[rows])
        if augment:
            x = self.augment(x, generator)
        return Batch(x.transpose(1, 2).contiguous(), y)

    # --- losses ----------------------------------------------------------------------------------------
    def forward_with_regularizer(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits (float32) and PointNet's feature-transform regulariser (None without a feature T-Net)."""
        tnet = getattr(model, "feature_tnet", None)
        captured: list[Tensor] = []
        handle = tnet.register_forward_hook(lambda _m, _a, out: captured.append(out)) if tnet is not None else None
        try:
            with autocast(self.device, self.amp):
                logits = model(x)
        finally:
            if handle is not None:
                handle.remove()
        reg = feature_transform_regularizer(captured[-1]) if captured else None
        return logits.float(), reg

    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Tensor:
        logits, reg = self.forward_with_regularizer(model, batch.inputs)
        loss = F.cross_entropy(logits, batch.targets, label_smoothing=label_smoothing)
        return loss if reg is None else loss + FEATURE_TRANSFORM_WEIGHT * reg

    def mixup_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        """RSMix (k-NN variant), batched: lambda ~ Beta(alpha, alpha) once per batch, partner = a random
        permutation of the batch, k = round(lambda * P). For each cloud a, the k points nearest to a random query
        point q_a of a are removed and replaced by the k points of its partner b nearest to a random query point
        q_b of b, translated by q_a - q_b (a rigid subset, moved so the query points coincide); the cloud keeps
        P points. Labels are weighted by the share of points: loss = (1 - k/P) CE(y_a) + (k/P) CE(y_b).

        Deviation from the authors' code: there the subset size is ceil(r * 512) with r ~ Beta(beta, beta), so at
        most half of a 1024-point cloud comes from the partner, and each sample gets its own share; here the share
        is lambda itself (MixUp's, one per batch as NFT's image MixUp), so every share in [0, 1] occurs and the
        batch is mixed with one top-k; with a symmetric Beta and a random partner, a share above 1/2 is a share
        below 1/2 with the roles of the two clouds swapped.
        """
        lam = beta_sample(alpha, generator)
        x, perm, share = rsmix(batch.inputs.transpose(1, 2), lam, generator)
        logits, reg = self.forward_with_regularizer(model, x.transpose(1, 2).contiguous())
        y_a, y_b = batch.targets, batch.targets[perm]
        loss = (1 - share) * F.cross_entropy(logits, y_a) + share * F.cross_entropy(logits, y_b)
        return loss if reg is None else loss + FEATURE_TRANSFORM_WEIGHT * reg

    def perturbable_input(self, batch: Batch) -> Tensor:
        """The coordinates (N, 3, P): a universal perturbation of shape (3, P) is a per-point offset field."""
        return batch.inputs

    def with_input(self, batch: Batch, inputs: Tensor) -> Batch:
        return Batch(inputs, batch.targets)

    def feature_layer(self, model: nn.Module) -> nn.Module:
        """The last shared-MLP layer before the global max-pool (PointNet's 1024-channel layer)."""
        return model.get_submodule(model.feature_layer)

    # --- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        with autocast(self.device, self.amp):
            return model(x).argmax(1)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: PointSet) -> float:
        was_training = model.training
        model.eval()
        correct = sum(int((self.predict(model, b.inputs) == b.targets).sum()) for b in self.iter_batches(split))
        model.train(was_training)
        return correct / max(1, len(split))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, attack: Attack | None) -> dict[str, float | None]:
        """C-ACC on the whole clean test set; ASR and RA on triggered test clouds whose true label is not the
        target (all-to-one), all clouds for all-to-all."""
        self.check_attack(attack)
        was_training = model.training
        model.eval()
        correct = hits = robust = counted = 0
        for b in self.iter_batches(self.test):
            correct += int((self.predict(model, b.inputs) == b.targets).sum())
            if attack is None:
                continue
            keep = attack.counts_for_asr(b.targets)
            if not keep.any():
                continue
            x, y = b.inputs[keep].transpose(1, 2), b.targets[keep]
            pred = self.predict(model, attack.apply(x).transpose(1, 2).contiguous())
            hits += int((pred == attack.poison_label(y, self.num_classes)).sum())
            robust += int((pred == y).sum())
            counted += len(y)
        model.train(was_training)
        out: dict[str, float | None] = {"clean_acc": correct / len(self.test), "asr": None, "ra": None}
        if attack is not None:
            out["asr"], out["ra"] = hits / max(1, counted), robust / max(1, counted)
        return out

    # --- PCBA: the surrogate classifier and the fitted trigger location ---------------------------------
    def _key(self, obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def surrogate(self, samples: int, epochs: int | None, seed: int) -> tuple[nn.Module, Tensor]:
        """A clean classifier (the task's architecture and recipe) trained on ``samples`` clouds of the attacker's
        clean training split, cached under ``<cache_dir>/surrogates/``; and the indices (into the attacker's
        split) it was trained on."""
        from safetensors.torch import load_file, save_file

        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self.attacker_idx), generator=g)[: min(samples, len(self.attacker_idx))]
        pick = pick.sort().values
        recipe = {**self.recipe(), **({"epochs": epochs} if epochs else {})}
        cfg = {"task": self.config(), "samples": samples, "recipe": recipe, "seed": seed, **precision_identity()}
        folder = self.cache_dir / "surrogates" / self._key(cfg)
        model = self.build_model()
        if (folder / "model.safetensors").is_file():
            model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(self.device)))
            return model.eval(), pick
        split = self._train_on_device.subset(self.attacker_idx[pick])
        torch.manual_seed(seed)
        model = self.build_model()
        model.train()
        n, bs = len(split), recipe["batch_size"]
        steps_per_epoch = max(1, n // bs) if n >= 2 * bs else 1
        opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], betas=(recipe["momentum"], 0.999),
                               weight_decay=recipe["weight_decay"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=recipe["step_epochs"] * steps_per_epoch,
                                                gamma=recipe["gamma"])
        for _ in range(recipe["epochs"]):
            for batch in self.epoch_batches(split, bs, g):
                loss = self.loss(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError("pcba surrogate: loss is not finite; lower the recipe's lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"model.safetensors.tmp{os.getpid()}"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / "model.safetensors")
        summary = {**cfg, "train_acc": self.accuracy(model, split), "test_acc": self.evaluate(model, None)["clean_acc"]}
        (folder / "surrogate.json").write_text(json.dumps(summary, indent=1, default=str))
        return model, pick

    def fit_attack(self, attack: Attack) -> dict[str, Any]:
        """Fit an attack's trigger (PCBA's location) against a cached surrogate; the result is cached too."""
        key = self._key({"task": self.config(), "attack": attack.config(), **precision_identity()})
        path = self.cache_dir / "attacks" / f"{attack.name}-{key}.json"
        if path.is_file():
            info = json.loads(path.read_text())
            attack.set_center(info["center"])
            return info
        model, pick = self.surrogate(attack.surrogate_samples, attack.surrogate_epochs, attack.seed)
        train = self._train_on_device.subset(self.attacker_idx[pick])
        source = train.x[attack.counts_for_asr(train.y)]
        info = attack.fit(model, source, torch.Generator().manual_seed(attack.seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)
        return info


def rsmix(x: Tensor, lam: float, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """RSMix's rigid subset mix of clouds ``x`` (n, P, 3) with a random permutation of themselves (see
    :meth:`PointCloudTask.mixup_loss`): returns the mixed clouds (n, P, 3), the partner permutation and the share
    k / P of points taken from the partner, k = round(lam * P)."""
    n, p, _ = x.shape
    perm = torch.randperm(n, generator=generator).to(x.device)
    k = min(p, max(0, round(lam * p)))
    qa = torch.randint(0, p, (n,), generator=generator).to(x.device)
    qb = torch.randint(0, p, (n,), generator=generator).to(x.device)
    if k > 0:
        xb = x[perm]
        rows = torch.arange(n, device=x.device)
        ca, cb = x[rows, qa], xb[rows, qb]  # the query points, (n, 3)
        erase = (x - ca[:, None]).pow(2).sum(-1).topk(k, dim=1, largest=False).indices
        take = (xb - cb[:, None]).pow(2).sum(-1).topk(k, dim=1, largest=False).indices
        added = torch.gather(xb, 1, take[..., None].expand(-1, -1, 3)) + (ca - cb)[:, None]
        x = x.scatter(1, erase[..., None].expand(-1, -1, 3), added)
    return x, perm, k / p
