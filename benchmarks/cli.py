"""``nftbench``: train victims, purify them, run cells, run presets, list what is registered."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import yaml

from attacks import ATTACKS, create_attack
from benchmarks.run import Paths, RunConfig, purify_victim, run_once
from benchmarks.victims import get_victim
from defenses import DEFENSES
from tasks import TASKS, CleanBudget, create_task
from tasks.base import PRECISION_ENV, PRECISIONS, set_precision


def parse_params(items: list[str] | None) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision of training and defences: auto = bf16 on GPUs and on CPUs with native "
                        "bf16 (AMX, AVX512-BF16), else fp32; fp32; bf16. Recorded in victim.json and run records; "
                        f"fp32 or bf16 give victims and runs ids of their own (default: ${PRECISION_ENV} or auto)")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_precision(p)
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: $DATA_ROOT or ./data)")
    p.add_argument("--runs-dir", default="runs", help="cache of decoded datasets, victims and records")
    p.add_argument("--download", action="store_true", help="allow downloading a missing dataset")
    p.add_argument("--seed", type=int, default=0)


def add_victim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="image")
    p.add_argument("--dataset", default=None, help="default: the task's embedded dataset (image: digits, "
                   "pointcloud: procedural)")
    p.add_argument("--model", default=None, help="default: the dataset's model for --scale")
    p.add_argument("--model-param", action="append", metavar="KEY=VALUE",
                   help="model option, repeatable (e.g. width=0.5, pretrained=/path/resnet50.pth)")
    p.add_argument("--scale", default="quick", choices=["quick", "paper"])
    p.add_argument("--attack", default=None, help="a registered attack of the task's modality, or 'none' for a "
                   "benign model (default: image badnets, pointcloud pointba-i)")
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--target", type=int, default=None)
    p.add_argument("--all-to-all", action="store_true")
    p.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="trigger parameter, repeatable")


def add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val-frac", type=float, default=None, help="clean data as a fraction of train (default 0.01)")
    g.add_argument("--per-class", type=int, default=None, help="clean samples per class")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="defence option, repeatable")


def attack_params(args: argparse.Namespace) -> dict[str, Any]:
    params = parse_params(args.attack_param)
    if args.poison_rate is not None:
        params["poison_rate"] = args.poison_rate
    if args.target is not None:
        params["target"] = args.target
    if args.all_to_all:
        params["mode"] = "all-to-all"
    return params


def budget_of(args: argparse.Namespace) -> CleanBudget:
    if args.per_class is not None:
        return CleanBudget(fraction=None, per_class=args.per_class)
    return CleanBudget(fraction=0.01 if args.val_frac is None else args.val_frac)


def paths_of(args: argparse.Namespace) -> Paths:
    return Paths(runs_dir=args.runs_dir, data_root=args.data_root, device=args.device, download=args.download)


def cmd_list(args: argparse.Namespace) -> None:
    from tasks.detection import MODELS as DETECTION_MODELS
    from tasks.detection_data import DETECTION_DATASETS
    from tasks.image_data import IMAGE_DATASETS
    from tasks.image_models import IMAGE_MODELS
    from tasks.point_data import POINTCLOUD_DATASETS
    from tasks.point_models import POINTCLOUD_MODELS
    from tasks.translation import MODELS as TRANSLATION_MODELS
    from tasks.translation_data import TRANSLATION_DATASETS

    sections = {
        "tasks": TASKS.names(), "datasets (image)": IMAGE_DATASETS.names(), "models (image)": IMAGE_MODELS.names(),
        "datasets (pointcloud)": POINTCLOUD_DATASETS.names(), "models (pointcloud)": POINTCLOUD_MODELS.names(),
        "datasets (translation)": TRANSLATION_DATASETS.names(), "models (translation)": list(TRANSLATION_MODELS),
        "datasets (detection)": [*DETECTION_DATASETS.names(), "<path to a YOLO dataset .yaml>"],
        "models (detection)": list(DETECTION_MODELS),
        "attacks": [f"{n:12s} [{c.modality}] {c.paper}" for n, c in ATTACKS.items()],
        "defenses": [f"{n:12s} {s.paper}" for n, s in DEFENSES.items()],
    }
    wanted = [k for k in sections if getattr(args, k.split()[0])]
    for key in wanted or sections:
        print(f"{key}:")
        for line in sections[key]:
            print(f"  {line}")


def cmd_train_victim(args: argparse.Namespace) -> None:
    attack = None if args.attack == "none" else create_attack(args.attack, seed=args.seed, **attack_params(args))
    task = create_task(args.task, dataset=args.dataset, model=args.model, model_kwargs=parse_params(args.model_param),
                       scale=args.scale, data_root=args.data_root, cache_dir=args.runs_dir, device=args.device,
                       download=args.download)
    _, meta, d = get_victim(task, attack, args.seed, args.runs_dir)
    m = meta["metrics"]
    print(json.dumps({"victim": str(d), **m, "train_time_s": round(meta["train_time_s"], 1)}, indent=1))


def cmd_purify(args: argparse.Namespace) -> None:
    record, out = purify_victim(args.victim, args.defense, parse_params(args.set), budget_of(args), args.seed,
                                paths_of(args))
    print_record(record, out)


def cmd_run(args: argparse.Namespace) -> None:
    cfg = RunConfig(task=args.task, dataset=args.dataset, model=args.model,
                    model_kwargs=parse_params(args.model_param), scale=args.scale,
                    attack=None if args.attack == "none" else args.attack, attack_params=attack_params(args),
                    defense=args.defense, defense_params=parse_params(args.set), seed=args.seed,
                    val_frac=args.val_frac if args.val_frac is not None else 0.01, per_class=args.per_class)
    record = run_once(cfg, paths_of(args), results_csv=args.results, records_dir=Path(args.runs_dir) / "records")
    print_record(record, Path(args.runs_dir) / "records" / f"{record['run_id']}.json")


def print_record(record: dict[str, Any], where: Path) -> None:
    b, a = record.get("before") or {}, record.get("after") or {}

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    print(f"run {record['run_id']} [{record['status']}] -> {where}")
    if record["status"] != "ok":
        print(f"error: {record['error']}", file=sys.stderr)
        sys.exit(1)
    print(f"before: C-ACC {pct(b.get('clean_acc'))}  ASR {pct(b.get('asr'))}  RA {pct(b.get('ra'))}")
    print(f"after:  C-ACC {pct(a.get('clean_acc'))}  ASR {pct(a.get('asr'))}  RA {pct(a.get('ra'))}  "
          f"DER {pct(record.get('der'))}  defence {record['defense_info']['wall_time_s']:.1f}s")


def cmd_bench(args: argparse.Namespace) -> None:
    from benchmarks.bench import run_preset

    run_preset(args.preset, Path(args.out), paths_of(args))


def cmd_sweep(args: argparse.Namespace) -> None:
    from benchmarks.sweep import load_sweep, run_sweep

    grid = load_sweep(args.config)  # the whole grid is validated here, before any work
    out = Path(args.out or Path("results") / grid["name"])
    result = run_sweep(grid, out, paths_of(args), executor=args.executor, workers=args.workers,
                       address=args.address, dry_run=args.dry_run, reuse=args.reuse or (), only=args.only or ())
    if not args.dry_run and result.failed:
        print(f"nftbench: {result.failed} cell(s) failed (status error in {out / 'results.csv'}; logs in "
              f"{out / 'logs'}); rerun the same command to retry them", file=sys.stderr)
        sys.exit(1)


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from benchmarks.leaderboard import run

    run(args)


def cmd_perf(args: argparse.Namespace) -> None:
    from benchmarks.perf import run_perf

    run_perf(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nftbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered tasks, datasets, models, attacks, defences")
    for k in ("tasks", "datasets", "models", "attacks", "defenses"):
        p.add_argument(f"--{k}", action="store_true")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("train-victim", help="train (or reuse) a backdoored or benign model")
    add_victim_args(p)
    add_common(p)
    p.set_defaults(fn=cmd_train_victim)

    p = sub.add_parser("purify", help="remove the backdoor from a saved victim")
    p.add_argument("--victim", required=True, help="victim directory (model.safetensors + victim.json)")
    p.add_argument("--defense", default="nft")
    add_budget_args(p)
    add_common(p)
    p.set_defaults(fn=cmd_purify)

    p = sub.add_parser("run", help="victim (cached) -> defence -> record + CSV row")
    add_victim_args(p)
    p.add_argument("--defense", default="nft")
    add_budget_args(p)
    p.add_argument("--results", default="runs/results.csv", help="CSV the run's row is appended to")
    add_common(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="run a preset grid and print its table")
    p.add_argument("--preset", default="quick", help="quick | paper | path to a YAML file")
    p.add_argument("--out", default="results/quick")
    add_common(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("sweep", help="run a YAML grid of cells (resumable; local or Ray executor)",
                       description="Run every cell of a sweep YAML (a preset name or a path). Finished cells "
                       "(status ok) are skipped, failed cells are recorded and retried on the next run.")
    p.add_argument("config", help="quick | paper | path to a sweep YAML (see benchmarks/configs/)")
    p.add_argument("--out", default=None, help="output folder (default: results/<grid name>)")
    p.add_argument("--dry-run", action="store_true", help="print the cells, their hashes and a cost estimate")
    p.add_argument("--reuse", action="append", metavar="DIR",
                   help="another sweep's --out folder: its ok records of the same run id are copied, not rerun")
    p.add_argument("--only", action="append", metavar="KEY=VALUE[,VALUE]",
                   help="run only the grid's cells with these values (task, dataset, model, attack, defense, seed; "
                        "repeatable, all must match), e.g. one process per attack into the same --out")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", default="auto",
                   help="local executor: worker processes, or auto = one per visible GPU (1 on CPU)")
    p.add_argument("--address", default=None,
                   help="ray executor: cluster address (auto = the running cluster; default: a local Ray instance)")
    add_common(p)  # --seed is unused here: the grid's seeds key sets the seeds
    p.set_defaults(fn=cmd_sweep)

    from benchmarks import leaderboard, perf

    p = sub.add_parser("leaderboard", help="aggregate run records into per-dataset CSVs, LEADERBOARD.md and plots",
                       description=leaderboard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    leaderboard.add_arguments(p)
    p.set_defaults(fn=cmd_leaderboard)

    p = sub.add_parser("perf", help="victim training throughput and every defence's wall time on one victim",
                       description=perf.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    perf.add_arguments(p)
    p.set_defaults(fn=cmd_perf)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "precision", None):
            set_precision(args.precision)
        if getattr(args, "task", None) is not None and hasattr(args, "dataset"):
            task_cls = TASKS.get(args.task)
            args.dataset = args.dataset or task_cls.default_dataset
            if hasattr(args, "attack"):
                args.attack = args.attack or task_cls.default_attack
        args.fn(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError, FloatingPointError, pickle.UnpicklingError) as e:
        print(f"nftbench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
