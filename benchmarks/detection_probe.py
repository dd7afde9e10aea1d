"""Where a detection backdoor takes hold: per-object success by the object's distance from the trigger.

For a cached BadDet victim (GMA or RMA), every non-target object of the triggered test images is a trial; it
succeeds when a target-class detection (conf 0.25) overlaps it at IoU >= 0.5. Trials are grouped by the distance,
in pixels, from the object's centre to the trigger's centre. A corner trigger that flips only nearby objects is
one the detector's receptive field (or capacity) cannot carry across the image.

    python -m benchmarks.detection_probe --attack gma [--epochs 30] [--runs-dir runs]

The victim is the one ``nftbench sweep benchmarks/configs/detection-quick.yaml`` trains (trained here if absent).
"""

from __future__ import annotations

import argparse

import torch
from torchvision.ops import box_iou

from attacks import create_attack
from tasks import create_task
from tasks.detection import EVAL_IOU, PREDICT_CONF
from tasks.detection_data import BoxSet, xywh_to_xyxy
from training.victims import get_victim

BINS = (0, 16, 24, 32, 40, 48, 64, 91)


def flips_by_distance(task, model, attack) -> list[tuple[str, int, float, float]]:
    """Rows ``(bin, objects, target-class hit rate with trigger, same without)`` over the test set."""
    size = task.test.x.shape[-1]
    triggered, clean_boxes, _ = attack.triggered_test(task.test, task.num_classes)
    eligible = torch.nonzero(attack.eligible(task.test.boxes.cpu(), len(task.test))).flatten()
    clean = BoxSet(task.test.subset(eligible.to(task.test.x.device)).x, clean_boxes)
    gt = clean_boxes[clean_boxes[:, 1] != attack.target]
    hits = {}
    for name, split in (("triggered", triggered), ("clean", clean)):
        dets = task.detect(model, split, PREDICT_CONF, EVAL_IOU)
        ok = torch.zeros(len(gt), dtype=torch.bool)
        for k, b in enumerate(gt):
            d = dets[int(b[0])]
            d = d[d[:, 5] == attack.target]
            if len(d):
                ok[k] = bool((box_iou(xywh_to_xyxy(b[2:6].view(1, 4)).to(d.device) * size, d[:, :4]) >= 0.5).any())
        hits[name] = ok
    # GMA's trigger sits at the top-left corner; RMA's inside each object (distance 0 by construction).
    centre = torch.full((2,), attack.side(size) / 2) if attack.name == "gma" else None
    dist = (torch.zeros(len(gt)) if centre is None else
            torch.linalg.vector_norm(gt[:, 2:4].cpu() * size - centre, dim=1))
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        sel = (dist >= lo) & (dist < hi)
        if sel.any():
            rows.append((f"{lo}-{hi}", int(sel.sum()), float(hits["triggered"][sel].float().mean()),
                         float(hits["clean"][sel].float().mean())))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attack", default="gma", choices=("gma", "rma"))
    ap.add_argument("--model", default="yolov8-tiny")
    ap.add_argument("--epochs", type=int, default=None, help="victim epochs (default: the quick recipe's)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    task = create_task("detection", model=args.model, device="cpu", cache_dir=args.runs_dir)
    if args.epochs:
        recipe = task.recipe
        task.recipe = lambda: dict(recipe(), epochs=args.epochs)
    attack = create_attack(args.attack)
    model, meta, _ = get_victim(task, attack, args.seed, args.runs_dir)
    m = meta["metrics"]
    print(f"{args.attack} victim ({task.recipe()['epochs']} epochs, trigger {attack.side(task.data.size)} px): "
          f"mAP50 {m['clean_acc']:.3f}  ASR {m['asr']:.3f}")
    print("| distance (px) | objects | target-class hit, triggered | same, clean |\n|---|---|---|---|")
    for b, n, t, c in flips_by_distance(task, model, attack):
        print(f"| {b} | {n} | {t:.3f} | {c:.3f} |")


if __name__ == "__main__":
    main()
