"""Object-detection task adapter: a YOLO detector (Ultralytics) that NFT and the baselines purify through the task
protocol only.

- Data (``tasks/detection_data.py``): YOLO-format datasets letterboxed to S x S, or the procedural shapes set. A
  batch is ``Batch(inputs=images float (N, 3, S, S) in [0, 1], targets=boxes (M, 6) (image, class, cx, cy, w, h)
  normalised)``, the ``batch_idx`` / ``cls`` / ``bboxes`` of an Ultralytics batch. Augmentation: horizontal flip
  (boxes flipped with the image), batched on the device.
- Models: Ultralytics' ``DetectionModel`` built from its YOLOv8 YAML with the dataset's classes, randomly
  initialised (``yolov8n``, ``yolov8s``; ``yolov8-tiny`` is YOLOv8 at width 0.125 for CPU tests), and torchvision's
  ``ssdlite320`` (SSDlite320-MobileNetV3-Large, the SSD family NFT's paper purifies); ``pretrained=FILE`` in
  ``model_kwargs`` loads a user's safetensors state dict (never a pickled ``.pt``). Masks (NFT, ANP) go on their
  BatchNorm layers (``bn_gamma``, as for CNN classifiers).
- Loss: each library's own: Ultralytics' ``v8DetectionLoss`` (``DetectionModel.loss``; box, class and DFL terms
  with the default gains 7.5 / 0.5 / 1.5) divided by the batch size; torchvision's ``SSD.compute_loss`` (already
  normalised by the matched anchors).
- MixUp (Zhang et al., "Bag of Freebies for Training Object Detection Neural Networks", 2019): two images blended
  with lambda ~ Beta(alpha, alpha) (partner: a permutation of the batch, one lambda per batch as NFT's image
  MixUp), both box sets kept, loss = lambda * L(mixed, boxes_a) + (1 - lambda) * L(mixed, boxes_b) from one
  forward pass.
- Metrics: ``clean_acc`` = mAP@0.5 on the clean test set and ``map50_95`` beside it, computed with Ultralytics'
  evaluator (its ``DetectionValidator.match_predictions`` and ``ap_per_class``; NMS with conf 0.001, IoU 0.7 as its
  validator); ``asr`` by the attack's own rule (``attacks/detection.py``), on detections at conf 0.25 (its
  predictor's default); ``ra`` = mAP@0.5 of triggered test images against their clean labels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from common.checkpoint import load_checkpoint
from common.precision import autocast
from tasks.base import TASKS, Batch, CleanBudget, Task, beta_sample, resolve_device, select_clean
from tasks.detection_data import BoxSet, DetectionDataset, load_detection_dataset, xywh_to_xyxy

if TYPE_CHECKING:
    from attacks.base import Attack

MODELS: dict[str, tuple[str, dict[str, Any]]] = {  # Ultralytics YAML, scale overrides (depth, width, max channels)
    "yolov8-tiny": ("yolov8n.yaml", {"scales": {"t": [0.33, 0.125, 1024]}, "scale": "t"}),
    "yolov8n": ("yolov8n.yaml", {}),
    "yolov8s": ("yolov8s.yaml", {}),
    "ssdlite320": ("torchvision", {}),  # SSDlite320 with a MobileNetV3-Large backbone (torchvision), no weights
}
DEFAULT_MODELS = {"quick": "yolov8-tiny", "paper": "yolov8s"}
IMAGE_SIZES = {"procedural": 64, "coco128": 320, "voc": 320}
DEFAULT_SIZE = 640
RECIPES = {  # Ultralytics' defaults: SGD lr 0.01, momentum 0.937, weight decay 5e-4 (cosine here, per step)
    "quick": dict(epochs=30, batch_size=32, lr=0.01, momentum=0.937, nesterov=True, weight_decay=5e-4,
                  schedule="cosine"),
    "paper": dict(epochs=100, batch_size=64, lr=0.01, momentum=0.937, nesterov=True, weight_decay=5e-4,
                  schedule="cosine"),
}
EVAL_CONF, EVAL_IOU = 0.001, 0.7  # Ultralytics' validator
PREDICT_CONF = 0.25  # Ultralytics' predictor: what counts as "detected" for ASR
RESERVE_FRACTION = 0.1
# Ultralytics pip-installs missing optional packages at run time (e.g. a HEIF plugin when PIL meets a file it
# cannot identify); the suite installs only through its own files, so that is off unless a user turns it on.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")


def require_ultralytics() -> None:
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:
        raise ImportError("the detection task needs Ultralytics: pip install 'nftbench[detection]'")


class YoloDetector(nn.Module):
    """Ultralytics' ``DetectionModel`` (``self.net``) taking images in [0, 1]; ``forward`` returns its raw outputs."""

    def __init__(self, model_name: str, num_classes: int):
        super().__init__()
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel, yaml_model_load

        yaml_name, overrides = MODELS[model_name]
        cfg = {**yaml_model_load(yaml_name), **overrides, "nc": num_classes}
        self.net = DetectionModel(cfg, nc=num_classes, verbose=False)
        self.net.args = get_cfg()  # the loss gains (box 7.5, cls 0.5, dfl 1.5) the trainer would attach

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def loss(self, x: Tensor, boxes: Tensor, preds: Any = None) -> tuple[Tensor, Any]:
        """Ultralytics' loss of ``x`` against ``boxes`` (M, 6), summed over its terms, per image; and the preds."""
        preds = self.net(x) if preds is None else preds
        batch = {"batch_idx": boxes[:, 0], "cls": boxes[:, 1:2], "bboxes": boxes[:, 2:6]}
        total, _ = self.net.loss(batch, preds)
        return total.sum() / len(x), preds

    @torch.no_grad()
    def predict(self, x: Tensor, conf: float, iou: float) -> list[Tensor]:
        """Per image (n, 6) ``x1 y1 x2 y2 conf class`` in pixels (eval mode; Ultralytics' NMS)."""
        return [d.float() for d in nms(self.net(x), conf, iou)]

    def feature_layer(self) -> nn.Module:
        """The Conv-BN-SiLU ending the block that feeds the head's largest stride (P5)."""
        return self.net.model[self.net.model[-1].f[-1]].cv2


class SsdDetector(nn.Module):
    """torchvision's SSDlite320 (MobileNetV3-Large backbone; Howard et al. 2019, SSDlite of Sandler et al. 2018),
    randomly initialised, taking the task's S x S images at their size (its transform only normalises). Losses are
    torchvision's own (``SSD.compute_loss``: smooth-L1 box regression and hard-negative-mined classification)."""

    def __init__(self, num_classes: int, size: int):
        super().__init__()
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        self.net.transform = GeneralizedRCNNTransform(size, size, [0.5] * 3, [0.5] * 3, size_divisible=1,
                                                      fixed_size=(size, size))

    def forward(self, x: Tensor) -> Any:
        return self.heads(x)

    def heads(self, x: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Head outputs and anchors of a batch (what ``SSD.forward`` computes before its loss or post-processing)."""
        images, _ = self.net.transform(list(x))
        features = list(self.net.backbone(images.tensors).values())
        return self.net.head(features), self.net.anchor_generator(images, features)

    def loss(self, x: Tensor, boxes: Tensor, preds: Any = None) -> tuple[Tensor, Any]:
        head_outputs, anchors = self.heads(x) if preds is None else preds
        size = x.shape[-1]
        targets = []
        for i in range(len(x)):
            mine = boxes[boxes[:, 0] == i]
            targets.append({"boxes": xywh_to_xyxy(mine[:, 2:6]) * size, "labels": mine[:, 1].long() + 1})
        matched = [self.net.proposal_matcher(box_iou(t["boxes"], a)) if len(t["boxes"])
                   else torch.full((len(a),), -1, dtype=torch.long, device=a.device)
                   for t, a in zip(targets, anchors, strict=True)]
        losses = self.net.compute_loss(targets, head_outputs, anchors, matched)
        return losses["bbox_regression"] + losses["classification"], (head_outputs, anchors)

    @torch.no_grad()
    def predict(self, x: Tensor, conf: float, iou: float) -> list[Tensor]:
        self.net.score_thresh, self.net.nms_thresh = conf, iou
        out = self.net(list(x))
        return [torch.cat([d["boxes"], d["scores"][:, None], d["labels"][:, None].float() - 1], 1).float()
                for d in out]

    def feature_layer(self) -> nn.Module:
        """The backbone's last Conv-BN-Hardswish (MobileNetV3's last expansion, before SSDlite's extra blocks)."""
        return self.net.backbone.features[-1][-1]


def nms(raw: Any, conf: float, iou: float) -> list[Tensor]:
    """Ultralytics' NMS on eval-mode outputs: per image (n, 6) ``x1 y1 x2 y2 conf class`` in pixels."""
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:  # Ultralytics < 8.3.160
        from ultralytics.utils.ops import non_max_suppression
    return non_max_suppression(raw, conf_thres=conf, iou_thres=iou)


@TASKS.register("detection")
class DetectionTask(Task):
    """Detection adapter (see the module docstring). ``reserve_fraction`` of the training images (random, fixed
    ``split_seed``) is the defender's reserve; the attacker trains on the rest. ``num_classes`` is the dataset's;
    a clean budget per class counts images that contain the class."""

    name = "detection"
    default_dataset = "procedural"
    default_attack = "gma"
    eval_batch_size = 64

    def __init__(
        self, dataset: str = "procedural", model: str | None = None, scale: str = "quick",
        data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "runs", device: str = "auto",
        download: bool = False, image_size: int | None = None, reserve_fraction: float | None = None,
        split_seed: int = 0, amp: bool = True, model_kwargs: dict[str, Any] | None = None,
    ):
        if scale not in RECIPES:
            raise ValueError(f"scale must be one of {sorted(RECIPES)}, got {scale!r}")
        require_ultralytics()
        self.dataset_name, self.scale = dataset, scale
        self.model_name = model or DEFAULT_MODELS[scale]
        if self.model_name not in MODELS:
            raise ValueError(f"unknown detection model {self.model_name!r}; valid: {', '.join(MODELS)}")
        self.model_kwargs = dict(model_kwargs or {})
        self.device, self.amp, self.cache_dir = resolve_device(device), amp, Path(cache_dir)
        root = data_root or os.environ.get("DATA_ROOT", "data")
        size = image_size or IMAGE_SIZES.get(dataset, DEFAULT_SIZE)
        self.data: DetectionDataset = load_detection_dataset(dataset, root, cache_dir, size, download)
        self.num_classes = self.data.num_classes
        self.reserve_fraction = reserve_fraction or RESERVE_FRACTION
        self.split_seed = split_seed
        perm = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(split_seed))
        k = max(1, round(self.reserve_fraction * len(perm)))
        self.reserve_idx, self.attacker_idx = perm[:k].sort().values, perm[k:].sort().values
        self.test = self.data.test.to(self.device) if self.data.test.x.numel() < 2e9 else self.data.test

    # --- description --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "task": self.name, "dataset": self.dataset_name, "model": self.model_name, "scale": self.scale,
            "model_kwargs": self.model_kwargs, "image_size": self.data.size, "reserve_fraction": self.reserve_fraction,
            "split_seed": self.split_seed, "data_fingerprint": self.data.fingerprint,
        }

    def recipe(self) -> dict[str, Any]:
        return dict(RECIPES[self.scale])

    # --- model ----------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        if MODELS[self.model_name][0] == "torchvision":
            model: nn.Module = SsdDetector(self.num_classes, self.data.size)
        else:
            model = YoloDetector(self.model_name, self.num_classes)
        pretrained = self.model_kwargs.get("pretrained")
        if pretrained is not None:
            model = load_checkpoint(Path(pretrained).expanduser(), model)
        return model.to(self.device)

    # --- data -----------------------------------------------------------------------------------------
    def split_sizes(self, split: BoxSet) -> int:
        return len(split)

    def check_attack(self, attack: Attack | None) -> None:
        if attack is not None and getattr(attack, "modality", None) != "detection":
            kind = getattr(attack, "modality", None) or "non-detection"
            raise ValueError(f"attack {attack.name!r} is a {kind} attack; the detection task takes detection "
                             "attacks (gma, rma, oga, oda; see `nftbench list --attacks`)")

    def attacker_train(self, attack: Attack | None, seed: int) -> tuple[BoxSet, Tensor]:
        """The attacker's images with ``round(rate * N)`` of them (seeded) poisoned by ``attack`` (trigger stamped,
        boxes changed as the attack's rule says); the poisoned image indices."""
        self.check_attack(attack)
        train = self.data.train.subset(self.attacker_idx)
        if attack is None or attack.poison_rate == 0:
            return train.to(self.device), torch.empty(0, dtype=torch.long)
        idx = attack.poison_indices(train, torch.Generator().manual_seed(seed))
        return attack.poison(train, idx, torch.Generator().manual_seed(seed + 1)).to(self.device), idx

    def clean_split(self, budget: CleanBudget, seed: int) -> BoxSet:
        """``budget.fraction`` of the training images, or ``budget.per_class`` images containing each class, from
        the defender's reserve."""
        if budget.per_class is None:
            labels = torch.zeros(len(self.data.train), dtype=torch.long)
            return self.data.train.subset(select_clean(labels, self.reserve_idx, 1, budget, seed)).to(self.device)
        boxes = self.data.train.boxes
        has = torch.zeros(len(self.data.train), self.num_classes, dtype=torch.bool)
        has[boxes[:, 0].long(), boxes[:, 1].long()] = True
        g = torch.Generator().manual_seed(seed)
        chosen: list[int] = []
        for c in range(self.num_classes):
            pool = [int(i) for i in self.reserve_idx if has[i, c] and int(i) not in chosen]
            if len(pool) < budget.per_class:
                raise ValueError(f"the defender's reserve has only {len(pool)} images with class {c}; lower "
                                 f"--per-class below {budget.per_class}")
            chosen += [pool[i] for i in torch.randperm(len(pool), generator=g)[: budget.per_class].tolist()]
        return self.data.train.subset(torch.tensor(sorted(chosen))).to(self.device)

    # --- batches --------------------------------------------------------------------------------------
    def make_batch(self, split: BoxSet, idx: Tensor, augment: bool, generator: torch.Generator | None) -> Batch:
        part = split.subset(idx)
        x = part.x.to(self.device, non_blocking=True).float() / 255
        boxes = part.boxes.to(self.device)
        if augment and generator is not None:
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(self.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            boxes = boxes.clone()
            flipped = flip[boxes[:, 0].long()]
            boxes[:, 2] = torch.where(flipped, 1 - boxes[:, 2], boxes[:, 2])
        return Batch(x, boxes)

    def sample_batch(self, split: BoxSet, batch_size: int, generator: torch.Generator, augment: bool = True
                     ) -> Batch:
        return self.make_batch(split, torch.randint(0, len(split), (batch_size,), generator=generator), augment,
                               generator)

    def epoch_batches(self, split: BoxSet, batch_size: int, generator: torch.Generator, augment: bool = True
                      ) -> Iterator[Batch]:
        perm = torch.randperm(len(split), generator=generator)
        n = len(split) // batch_size * batch_size if len(split) >= 2 * batch_size else len(split)
        for idx in perm[:n].split(batch_size):
            yield self.make_batch(split, idx, augment, generator)

    def iter_batches(self, split: BoxSet, batch_size: int | None = None) -> Iterator[Batch]:
        for idx in torch.arange(len(split)).split(batch_size or self.eval_batch_size):
            yield self.make_batch(split, idx, False, None)

    # --- losses ---------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> Tensor:
        with autocast(self.device, self.amp):
            return model.loss(batch.inputs, batch.targets)[0].float()

    def mixup_loss(self, model: nn.Module, batch: Batch, alpha: float, generator: torch.Generator) -> Tensor:
        lam = beta_sample(alpha, generator)
        perm = torch.randperm(len(batch), generator=generator).to(self.device)
        inv = torch.argsort(perm)  # image i is mixed with image perm[i]: its partner boxes come from perm[i]
        boxes_b = batch.targets[torch.argsort(inv[batch.targets[:, 0].long()], stable=True)].clone()
        boxes_b[:, 0] = inv[boxes_b[:, 0].long()].to(boxes_b.dtype)
        x = lam * batch.inputs + (1 - lam) * batch.inputs[perm]
        with autocast(self.device, self.amp):
            loss_a, preds = model.loss(x, batch.targets)
            loss_b, _ = model.loss(x, boxes_b, preds)
        return (lam * loss_a + (1 - lam) * loss_b).float()

    def perturbable_input(self, batch: Batch) -> Tensor:
        return batch.inputs

    def with_input(self, batch: Batch, inputs: Tensor) -> Batch:
        return Batch(inputs, batch.targets)

    def feature_layer(self, model: nn.Module) -> nn.Module:
        """The model's last convolutional features, a Conv-BN-activation with f(0) = 0 (fine-pruning prunes their
        channels through that BN)."""
        return model.feature_layer()

    # --- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, model: nn.Module, split: BoxSet, conf: float, iou: float) -> list[Tensor]:
        """Detections per image of ``split``: (n, 6) ``x1 y1 x2 y2 conf class`` in pixels."""
        was_training = model.training
        model.eval()
        out: list[Tensor] = []
        for b in self.iter_batches(split):
            with autocast(self.device, self.amp):
                out += model.predict(b.inputs, conf, iou)
        model.train(was_training)
        return out

    def map(self, model: nn.Module, split: BoxSet, detections: list[Tensor] | None = None) -> tuple[float, float]:
        """(mAP@0.5, mAP@0.5:0.95) of ``model`` on ``split``, with Ultralytics' matching and ``ap_per_class``."""
        from ultralytics.models.yolo.detect import DetectionValidator
        from ultralytics.utils.metrics import ap_per_class, box_iou

        dets = detections if detections is not None else self.detect(model, split, EVAL_CONF, EVAL_IOU)
        validator = DetectionValidator()
        size = split.x.shape[-1]
        gt = split.boxes.to(self.device)
        tps, confs, pred_cls, target_cls = [], [], [], []
        for i, d in enumerate(dets):
            truth = gt[gt[:, 0] == i]
            target_cls.append(truth[:, 1].cpu())
            if len(d) == 0:
                continue
            correct = torch.zeros(len(d), len(validator.iouv), dtype=torch.bool)
            if len(truth):
                iou = box_iou(xywh_to_xyxy(truth[:, 2:6]) * size, d[:, :4])
                correct = validator.match_predictions(d[:, 5], truth[:, 1], iou)
            tps.append(correct.cpu())
            confs.append(d[:, 4].cpu())
            pred_cls.append(d[:, 5].cpu())
        if not tps or not sum(len(t) for t in target_cls):
            return 0.0, 0.0
        ap = ap_per_class(torch.cat(tps).numpy(), torch.cat(confs).numpy(), torch.cat(pred_cls).numpy(),
                          torch.cat(target_cls).numpy())[5]
        return float(np.mean(ap[:, 0])) if len(ap) else 0.0, float(np.mean(ap)) if len(ap) else 0.0

    def accuracy(self, model: nn.Module, split: BoxSet) -> float:
        """mAP@0.5 on ``split`` (what a defender selects with)."""
        return self.map(model, split)[0]

    def evaluate(self, model: nn.Module, attack: Attack | None) -> dict[str, float | None]:
        """``clean_acc`` = test mAP@0.5, ``map50_95``; ``asr`` by the attack's rule on its triggered test images
        (detections at conf 0.25); ``ra`` = mAP@0.5 of the triggered images against their clean labels."""
        self.check_attack(attack)
        map50, map5095 = self.map(model, self.test)
        out: dict[str, float | None] = {"clean_acc": map50, "asr": None, "ra": None, "map50_95": map5095}
        if attack is not None:
            triggered, clean_boxes, trials = attack.triggered_test(self.test, self.num_classes)
            dets = self.detect(model, triggered, PREDICT_CONF, EVAL_IOU)
            out["asr"] = attack.success_rate(dets, trials, triggered.x.shape[-1])
            out["ra"] = self.map(model, BoxSet(triggered.x, clean_boxes))[0]
        return out
