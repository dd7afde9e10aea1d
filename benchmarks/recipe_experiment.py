"""Recipe experiments for the fast scale (issue 20): ``python -m benchmarks.recipe_experiment KEY=VALUE ...``.

Trains (or loads, when cached) the benign CIFAR-10 model of the fast scale with the registered recipe overridden by
``KEY=VALUE`` items (YAML values, e.g. ``epochs=30 crop_padding=4``; ``seed=N``; ``model_kwargs={width: 1.5}``) and
prints its clean accuracy and training time. The victim is cached under ``runs/victims`` by its full config, the
overridden recipe included, so ``python -m benchmarks.victim_table --all-recipes`` tables every experiment.
``--data-root`` (default ``../shared/data``) must hold CIFAR-10.
"""

from __future__ import annotations

import argparse
import json

import yaml


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--runs-dir", default="runs")
    args = p.parse_args(argv)

    import tasks.image_classification as image
    from tasks import create_task
    from training.victims import get_victim

    over = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    seed, model_kwargs = over.pop("seed", 0), over.pop("model_kwargs", {})
    image.RECIPES["fast"] = {**image.RECIPES["fast"], **over}
    task = create_task("image", dataset="cifar10", scale="fast", data_root=args.data_root, device="cpu",
                       cache_dir=args.runs_dir, model_kwargs=model_kwargs)
    _, meta, d = get_victim(task, None, seed, args.runs_dir)
    print(json.dumps({"dir": str(d), "over": over, "model_kwargs": model_kwargs, **meta["metrics"],
                      "train_time_s": meta["train_time_s"], "threads": meta.get("torch_threads")}))


if __name__ == "__main__":
    main()
