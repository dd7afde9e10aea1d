"""``nftbench``: train victims, purify them, run cells, run presets, list what is registered."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from benchmarks import byo_args
from benchmarks.interrupts import INTERRUPTED, interrupt_handler
from benchmarks.train_args import add_gpu_arguments, add_precision

if TYPE_CHECKING:  # torch, the tasks and the defences load only when a command needs them (fast --help, list)
    from benchmarks.run import Paths
    from tasks import CleanBudget


def parse_params(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` items, each value read as plain YAML (a number, true/false, a string, a [list])."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:  # a syntax error, or a tag (!!python/...) that safe_load refuses
            problem = str(e).splitlines()[0]
            raise ValueError(f"{flag} {item!r}: {value!r} is not a plain YAML value ({problem}); give a number, "
                             "true/false, a string (quote it if it has : [ ] { } or #) or a [list]") from None
    return out


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_precision(p)
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: $DATA_ROOT or ./data)")
    p.add_argument("--runs-dir", default="runs", help="cache of decoded datasets, victims and records")
    p.add_argument("--download", action="store_true", help="allow downloading a missing dataset")
    p.add_argument("--seed", type=int, default=0, help="sweep, bench: replaces the grid's seeds: list (default: "
                   "the grid's seeds)")


def add_victim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="image")
    p.add_argument("--dataset", default=None, help="default: the task's embedded dataset (image: digits, "
                   "pointcloud: procedural)")
    p.add_argument("--model", default=None, help="default: the dataset's model for --scale")
    p.add_argument("--model-param", action="append", metavar="KEY=VALUE",
                   help="model option, repeatable (e.g. width=0.5, pretrained=/path/resnet50.safetensors)")
    p.add_argument("--scale", default="quick", choices=["quick", "fast", "paper"],
                   help="quick: CPU minutes; fast: airbench (image, 32x32 data), a paper-grade CIFAR-10 model on a CPU "
                   "in under an hour; paper: the paper's models and recipes")
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
    params = parse_params(args.attack_param, "--attack-param")
    if args.poison_rate is not None:
        params["poison_rate"] = args.poison_rate
    if args.target is not None:
        params["target"] = args.target
    if args.all_to_all:
        params["mode"] = "all-to-all"
    return params


def budget_of(args: argparse.Namespace) -> CleanBudget:
    from tasks import CleanBudget

    if args.per_class is not None:
        return CleanBudget(fraction=None, per_class=args.per_class)
    return CleanBudget(fraction=0.01 if args.val_frac is None else args.val_frac)


def paths_of(args: argparse.Namespace) -> Paths:
    from benchmarks.run import Paths

    return Paths(runs_dir=args.runs_dir, data_root=args.data_root, device=args.device, download=args.download)


def cmd_list(args: argparse.Namespace) -> None:
    from benchmarks import catalogue

    sections = catalogue.build() if args.live else catalogue.load()
    wanted = [k for k in sections if getattr(args, k.split()[0])]
    for key in wanted or sections:
        print(f"{key}:")
        for line in catalogue.lines(key, sections[key]):
            print(f"  {line}")


def cmd_train_victim(args: argparse.Namespace) -> None:
    from attacks import create_attack
    from benchmarks.validate import attack_class_problems, raise_problems, run_problems
    from tasks import create_task
    from training.victims import get_victim

    model_kwargs = parse_params(args.model_param, "--model-param")
    attack_name = None if args.attack == "none" else args.attack
    attack = None if attack_name is None else create_attack(attack_name, seed=args.seed, **attack_params(args))
    raise_problems(run_problems(args.task, args.dataset, args.model, args.scale, model_kwargs, attack_name, None))
    task = create_task(args.task, dataset=args.dataset, model=args.model, model_kwargs=model_kwargs,
                       scale=args.scale, data_root=args.data_root, cache_dir=args.runs_dir, device=args.device,
                       download=args.download)
    raise_problems(attack_class_problems(task, attack))
    if args.compile:
        os.environ["NFTBENCH_COMPILE"] = "1"
    _, meta, d = get_victim(task, attack, args.seed, args.runs_dir, args.max_steps)
    m = meta["metrics"]
    print(json.dumps({"victim": str(d), **m, "train_time_s": round(meta["train_time_s"], 1)}, indent=1))


def cmd_purify(args: argparse.Namespace) -> None:
    args.results = args.results or str(Path(args.runs_dir) / "results.csv")
    if args.model is not None or args.weights is not None or args.clean_data is not None:
        from benchmarks.byo import purify_from_args

        record, out = purify_from_args(args, parse_params(args.set), parse_params(args.model_param, "--model-param"))
    elif args.victim is None:
        raise ValueError("purify needs --victim DIR (a suite victim) or --model, --weights and --clean-data")
    else:
        from benchmarks.records import append_csv_row, labelled_row, write_record
        from benchmarks.run import purify_victim
        from common.fileio import check_write_path

        check_write_path(Path(args.victim) / "purified", "--victim", kind="folder")
        record, out = purify_victim(args.victim, args.defense, parse_params(args.set), budget_of(args), args.seed,
                                    paths_of(args))
        write_record(Path(args.runs_dir) / "records" / f"{record['run_id']}.json", record)
        append_csv_row(args.results, labelled_row(record))
    print_record(record, out)


def cmd_run(args: argparse.Namespace) -> None:
    from benchmarks.run import RunConfig, run_once

    cfg = RunConfig(task=args.task, dataset=args.dataset, model=args.model,
                    model_kwargs=parse_params(args.model_param, "--model-param"), scale=args.scale,
                    attack=None if args.attack == "none" else args.attack, attack_params=attack_params(args),
                    defense=args.defense, defense_params=parse_params(args.set), seed=args.seed,
                    val_frac=args.val_frac if args.val_frac is not None else 0.01, per_class=args.per_class)
    record = run_once(cfg, paths_of(args), results_csv=args.results, records_dir=Path(args.runs_dir) / "records")
    print_record(record, Path(args.runs_dir) / "records" / f"{record['run_id']}.json")
    print(f"victim: {Path(args.runs_dir) / 'victims' / record['victim_id']}  (nftbench purify --victim DIR ...)")


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


def grid_with_seed(config: str, seed: int | None) -> dict[str, Any]:
    """The sweep grid of ``config``, validated; ``--seed N`` replaces its ``seeds:`` list by ``[N]``."""
    from benchmarks.grid import load_sweep

    grid = load_sweep(config)  # the whole grid is validated here, before any work
    if seed is not None:
        if seed < 0:
            raise ValueError(f"--seed must be >= 0, got {seed}")
        grid["seeds"] = [seed]
    return grid


def cmd_bench(args: argparse.Namespace) -> None:
    from benchmarks.bench import run_preset

    grid = grid_with_seed(args.preset, args.seed)
    out = Path(args.out or Path("runs") / "bench" / grid["name"])
    run_preset(grid, out, paths_of(args))
    if args.compare:
        from benchmarks.compare import compare

        table, flagged = compare(out, args.compare, args.tolerance)
        print(f"\n{out} (new) beside {args.compare} (reference):\n\n{table}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from benchmarks.sweep import run_sweep
    from common.fileio import check_write_path

    grid = grid_with_seed(args.config, args.seed)
    out = Path(args.out or Path("results") / grid["name"])  # a grid's name is a plain folder name (load_sweep)
    check_write_path(out, "--out" if args.out else f"results/<name> of {args.config}", kind="folder")
    args.resume = (f"finished cells are kept in {out / 'records'}; run the same command again to resume (cells "
                   "that were running rerun)")
    result = run_sweep(grid, out, paths_of(args), executor=args.executor, workers=args.workers,
                       address=args.address, dry_run=args.dry_run, reuse=args.reuse or (), only=args.only or ())
    if not args.dry_run and result.failed:
        fix, retry = result.to_fix, result.failed - result.to_fix
        advice = []
        if fix:
            advice.append(f"{fix} need the config or data fixed first (rerunning alone fails the same way)")
        if retry:
            advice.append(f"{retry} failed for a passing reason (memory, a lost worker): rerun the same command "
                          "to retry them")
        print(f"nftbench: {result.failed} cell(s) failed (errors in {out / 'table.md'}, logs in {out / 'logs'}): "
              f"{'; '.join(advice)}", file=sys.stderr)
        sys.exit(1)


def cmd_cache(args: argparse.Namespace) -> None:
    from common.fileio import check_write_path
    from tasks.data_cache import clean_caches, list_caches

    if args.action == "ls":
        entries = list_caches(args.runs_dir)
        for e in entries:
            print(f"{e.size_bytes / 2**20:9.1f} MiB  {e.path.name:40s}  {e.state}  {e.source}".rstrip())
        if not entries:
            print(f"no decoded datasets under {Path(args.runs_dir) / 'datasets'}")
        return
    check_write_path(Path(args.runs_dir) / "datasets", "--runs-dir", kind="folder")
    removed = clean_caches(args.runs_dir, everything=args.all)
    for e in removed:
        print(f"removed {e.path} ({e.state})")
    print(f"{len(removed)} cache(s) removed ({sum(e.size_bytes for e in removed) / 2**20:.1f} MiB); "
          "victims and records are kept")


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from benchmarks.leaderboard import run

    run(args)


def cmd_perf(args: argparse.Namespace) -> None:
    from benchmarks.perf import run_perf

    run_perf(args)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nftbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered tasks, datasets, models, attacks, defences")
    for k in ("tasks", "datasets", "models", "attacks", "defenses"):
        p.add_argument(f"--{k}", action="store_true")
    p.add_argument("--live", action="store_true", help="read the registries (slow: imports torch and every task) "
                   "instead of benchmarks/catalogue.json; shows what you registered yourself")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("train-victim", help="train (or reuse) a backdoored or benign model")
    add_victim_args(p)
    add_gpu_arguments(p)
    add_common(p)
    p.set_defaults(fn=cmd_train_victim)

    p = sub.add_parser("purify", help="remove the backdoor from a saved victim, or from your own model")
    p.add_argument("--victim", default=None, help="victim directory (model.safetensors + victim.json)")
    p.add_argument("--defense", default="nft")
    add_budget_args(p)
    p.add_argument("--results", default=None, help="CSV the run's row is appended to (default: <runs-dir>/results.csv)")
    byo_args.add_arguments(p)
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
    p.add_argument("--out", default=None, help="output folder (default: runs/bench/<preset name>; the committed "
                   "reference tables live in results/)")
    p.add_argument("--compare", default=None, metavar="DIR", help="print the table beside a reference folder's "
                   "(e.g. results/quick) and flag cells beyond --tolerance")
    p.add_argument("--tolerance", type=float, default=2.0, help="percentage points on C-ACC, ASR, RA, DER (default 2)")
    add_common(p)
    p.set_defaults(fn=cmd_bench, seed=None)

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
    add_common(p)
    p.set_defaults(fn=cmd_sweep, seed=None)

    p = sub.add_parser("cache", help="list or remove decoded-dataset caches (runs/datasets)",
                       description="Decoded datasets are cached per data root and checked against their source "
                       "files (tasks/data_cache.py). ls: every cache, its size and state; clean: remove the stale "
                       "and incomplete ones (--all: every one). Victims and records are never touched.")
    p.add_argument("action", choices=["ls", "clean"])
    p.add_argument("--runs-dir", default="runs", help="the runs folder holding datasets/ (default: runs)")
    p.add_argument("--all", action="store_true", help="clean: remove every decoded dataset, not only stale ones")
    p.set_defaults(fn=cmd_cache)

    # leaderboard (pandas) and perf (torch) build their options only when named, so `nftbench --help` stays fast
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    for name, fn, help_text in (
        ("leaderboard", cmd_leaderboard, "aggregate run records into per-dataset CSVs, LEADERBOARD.md and plots, "
         "or a static site (--html)"),
        ("perf", cmd_perf, "victim training throughput and every defence's wall time on one victim"),
    ):
        if command != name:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(fn=fn)
    return parser


# Paths each command writes, checked before any work: (argument, flag, file | folder).
WRITE_PATHS = {
    "train-victim": [("runs_dir", "--runs-dir", "folder")],
    "purify": [("runs_dir", "--runs-dir", "folder")],
    "run": [("runs_dir", "--runs-dir", "folder"), ("results", "--results", "file")],
    "bench": [("runs_dir", "--runs-dir", "folder"), ("out", "--out", "folder")],
    "sweep": [("runs_dir", "--runs-dir", "folder"), ("out", "--out", "folder")],
    "leaderboard": [("out", "--out", "folder")],
    "perf": [("runs_dir", "--runs-dir", "folder"), ("json", "--json", "file")],
}
# Errors that are the input's or the environment's: one line naming the value or file and the fix, exit 2.
INPUT_ERRORS = (KeyError, ValueError, OSError, RuntimeError, FloatingPointError, pickle.UnpicklingError,
                yaml.YAMLError)


def main(argv: list[str] | None = None) -> None:
    args = build_parser(argv).parse_args(argv)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        signal.signal(signal.SIGINT, interrupt_handler)
    INTERRUPTED.clear()
    try:
        if getattr(args, "precision", None):
            from common.precision import set_precision

            set_precision(args.precision)
        if args.command in WRITE_PATHS:
            from common.fileio import check_write_path

            for attr, flag, kind in WRITE_PATHS[args.command]:
                if getattr(args, attr, None) is not None:
                    check_write_path(getattr(args, attr), flag, kind)
        if args.command == "run":
            from benchmarks.records import read_results_csv

            read_results_csv(args.results)  # another program's file is refused now, not after the run
        if getattr(args, "task", None) is not None and hasattr(args, "dataset"):
            from tasks import TASKS

            task_cls = TASKS.get(args.task)
            args.dataset = args.dataset or task_cls.default_dataset
            if hasattr(args, "attack"):
                args.attack = args.attack or task_cls.default_attack
        args.fn(args)
    except INPUT_ERRORS as e:
        print(f"nftbench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        interrupted = True  # exit below, once the interrupted frames (and their worker queues) are released
    else:
        interrupted = False
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        resume = getattr(args, "resume", None) or (
            f"finished victims stay cached in {Path(args.runs_dir) / 'victims'}; run the same command again to go on"
            if hasattr(args, "runs_dir") else "nothing was left half-written; run the same command again")
        print(f"\nnftbench: interrupted; {resume}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
