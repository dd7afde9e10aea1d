"""The victims (and benign models) cached under a runs dir, as a table: ``python -m benchmarks.victim_table``.

Reads every ``victims/<id>/victim.json`` whose task matches ``--dataset`` and ``--scale`` (and ``--model`` when
given) and writes one row per victim: attack, seed, clean accuracy, ASR, RA, training time, images/s, torch threads,
precision, the machine's load when training ended and the fingerprint of the data it was trained on (a re-encoded
copy of a dataset, as in the JPEG recipe experiments, has its own). Issue 20 commits it beside the fast grid's
results, so the benign accuracy over seeds and the minutes per victim are read from the models themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.records import params_label
from common.hashing import config_hash

COLUMNS = ["victim_id", "model", "attack", "seed", "clean_acc", "asr", "ra", "train_min", "images_per_s",
           "torch_threads", "precision", "load_avg_at_end", "epochs", "recipe_id", "data_fingerprint", "device",
           "created"]


def current_recipe(dataset: str, scale: str) -> dict[str, Any]:
    """The image task's registered recipe for (dataset, scale), as ``ImageClassificationTask.recipe`` builds it."""
    from tasks.image_classification import DATASET_RECIPES, RECIPES

    return {**RECIPES[scale], **DATASET_RECIPES.get((dataset, scale), {})}


def victim_rows(runs_dir: str | Path, dataset: str, scale: str, model: str | None = None,
                recipe: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of the victims of (dataset, scale[, model]); with ``recipe``, only those trained with exactly it."""
    rows = []
    for path in sorted(Path(runs_dir).glob("victims/*/victim.json")):
        meta = json.loads(path.read_text())
        task, attack = meta["config"]["task"], meta["config"]["attack"]
        if task.get("dataset") != dataset or task.get("scale") != scale or (model and task.get("model") != model):
            continue
        if recipe is not None and meta["config"]["recipe"] != recipe:
            continue
        m = meta["metrics"]
        rows.append({
            "victim_id": meta["victim_id"], "model": params_label(task.get("model"), task.get("model_kwargs") or {}),
            "attack": attack["name"] if attack else "none",
            "seed": meta["config"]["seed"], "clean_acc": m["clean_acc"], "asr": m.get("asr"), "ra": m.get("ra"),
            "train_min": round(meta["train_time_s"] / 60, 1), "images_per_s": round(meta["train_images_per_s"], 1),
            "torch_threads": meta.get("torch_threads"), "precision": meta.get("precision"),
            "load_avg_at_end": meta.get("load_avg_at_end"), "epochs": meta["config"]["recipe"]["epochs"],
            "recipe_id": config_hash(meta["config"]["recipe"])[:8], "data_fingerprint": task.get("data_fingerprint"),
            "device": meta.get("device"), "created": meta.get("created"),
        })
    return sorted(rows, key=lambda r: (r["attack"] != "none", r["attack"], r["seed"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.victim_table", description=__doc__)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--scale", default="fast")
    p.add_argument("--model", default=None)
    p.add_argument("--all-recipes", action="store_true",
                   help="also victims trained with another recipe than the registered one (recipe experiments)")
    p.add_argument("--out", default=None, help="write the table as CSV here (default: print it)")
    args = p.parse_args(argv)
    recipe = None if args.all_recipes else current_recipe(args.dataset, args.scale)
    table = pd.DataFrame(victim_rows(args.runs_dir, args.dataset, args.scale, args.model, recipe), columns=COLUMNS)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
