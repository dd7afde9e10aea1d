"""Performance, side by side in one run on one victim: the victim's training throughput and every defence's time.

``python -m benchmarks.perf`` or ``nftbench perf``:

- victim training throughput (images/s): a fresh model of the task takes ``--train-steps`` steps of the task's
  recipe (batch size, optimiser and its parameter groups, schedule, lookahead where the recipe has it,
  augmentation, label smoothing) on the attacker's poisoned training set, timed after ``--warmup-steps`` untimed
  steps, with the torch thread count and precision stated;
- the wall time of every registered defence (``purify``'s ``wall_time_s``, CUDA-synchronised) on a copy of the
  cached victim (``training.victims.get_victim``: trained once, then loaded) and the defender's clean split, with
  its default options, or with ``--quick`` step counts scaled by ``--quick-factor`` (stated in the output);
  printed as a table with each defence's ratio to NFT's time;
- or, with ``--variants CONFIG``, the defence entries of a sweep config instead, labelled as the sweep labels them:
  ``nftbench perf --variants nft-ablations`` times every NFT ablation of issue 9 side by side on one victim (with
  ``--quick``, a variant's own step count is scaled too).

Nothing here reads test data: the defences get the defender's view that ``purify`` builds (the clean split and the
protocol's operations, nothing else), and no timing decision (warm-up, step counts, repeats) depends on a metric.
A victim that is not cached yet is trained first, which evaluates it once for its ``victim.json``, as every run
does.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from attacks import create_attack
from benchmarks.records import params_label
from benchmarks.train_args import add_gpu_arguments, add_precision
from common.environment import device_name, versions
from common.guards import FiniteCheck, maybe_compile
from common.precision import numerics, set_precision
from defenses import DEFENSES, purify
from tasks import CleanBudget, Task, create_task
from training.loop import recipe_optimizer, recipe_step
from training.victims import get_victim

# The option(s) that set how long each defence runs; --quick scales them. A defence not listed here gets its
# integer fields with one of GENERIC_STEP_FIELDS' names scaled.
STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "nft": ("steps",), "ft": ("steps",), "fine-pruning": ("steps",), "anp": ("iterations",), "i-bau": ("rounds",),
    "clp": (), "rnp": ("unlearn_epochs", "recover_epochs"), "nad": ("epochs", "teacher_epochs"),
}
GENERIC_STEP_FIELDS = ("steps", "iterations", "rounds", "epochs")
PASSES = ("forward_passes", "forward_samples", "backward_passes", "backward_samples")  # what purify counts


def step_fields(name: str) -> tuple[str, ...]:
    if name in STEP_FIELDS:
        return STEP_FIELDS[name]
    defaults = DEFENSES.get(name).make_config()
    return tuple(f.name for f in fields(defaults) if f.name in GENERIC_STEP_FIELDS
                 and isinstance(getattr(defaults, f.name), int) and not isinstance(getattr(defaults, f.name), bool))


def quick_options(name: str, factor: float) -> dict[str, int]:
    """The defence's step counts times ``factor`` (at least 1)."""
    defaults = DEFENSES.get(name).make_config()
    return {f: max(1, round(getattr(defaults, f) * factor)) for f in step_fields(name)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_throughput(task: Task, attack: Any, seed: int, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of the victim's training recipe: ``warmup`` untimed steps, then ``steps`` timed ones."""
    split, _ = task.attacker_train(attack, seed)
    recipe = task.recipe()
    n = task.split_sizes(split)
    bs = min(n, recipe["batch_size"])
    torch.manual_seed(seed)
    model = task.build_model().train()
    opt, sched = recipe_optimizer(model, recipe, n)
    forward, finite = maybe_compile(model), FiniteCheck("perf: victim training")  # as the trainer: no sync per step
    g = torch.Generator().manual_seed(seed + 1)
    batches = task.epoch_batches(split, bs, g)
    images = 0

    def step(i: int) -> int:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # next epoch, as the trainer does
            batches = task.epoch_batches(split, bs, g)
            batch = next(batches)
        recipe_step(task, forward, batch, recipe, opt, sched, finite, i)
        return len(batch)

    for i in range(warmup):
        step(i)
    _sync(task.device)
    start = time.perf_counter()
    for i in range(steps):
        images += step(warmup + i)
    _sync(task.device)
    seconds = time.perf_counter() - start
    finite.finish(warmup + steps - 1)
    return {"images_per_s": images / seconds, "seconds": seconds, "steps": steps, "warmup_steps": warmup,
            "batch_size": bs, "images": images, "train_samples": n, **numerics(task)}


def _warm_up(model: torch.nn.Module, task: Task, clean: Any, seed: int) -> None:
    """One untimed forward/backward on a clean batch, so the first defence does not pay for kernel set-up."""
    m = copy.deepcopy(model).train()
    loss = task.loss(m, task.sample_batch(clean, 128, torch.Generator().manual_seed(seed)))
    loss.backward()
    _sync(task.device)


def time_defenses(task: Task, model: torch.nn.Module, clean: Any, runs: list[tuple[str, str, dict[str, Any]]],
                  seed: int, repeats: int = 1) -> list[dict[str, Any]]:
    """Each (label, defence, options) run ``repeats`` times on a fresh copy of ``model``; the median wall time, or
    the error, and the ratio to the run labelled ``nft`` (the paper's defaults)."""
    _warm_up(model, task, clean, seed)
    rows = []
    for label, name, options in runs:
        row: dict[str, Any] = {"defense": label, "name": name, "options": options, "times_s": []}
        try:
            for _ in range(repeats):
                _, info = purify(name, copy.deepcopy(model), task, clean, options, seed=seed)
                row["times_s"].append(info["wall_time_s"])
            row["time_s"] = statistics.median(row["times_s"])
            row.update({k: info[k] for k in PASSES})
        except Exception as e:  # noqa: BLE001  (reported in the table; the other defences still run)
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"  {label}: " + (f"{row['time_s']:.3f} s" if "time_s" in row else row["error"]), file=sys.stderr,
              flush=True)
    nft = next((r.get("time_s") for r in rows if r["defense"] == "nft"), None)
    for r in rows:
        r["ratio_to_nft"] = r["time_s"] / nft if nft and "time_s" in r else None
    return rows


def sweep_variants(config: str) -> list[tuple[str, dict[str, Any]]]:
    """The ``defenses:`` entries of a sweep config (``nft-ablations`` or a YAML path), ``none`` left out, as
    (name, options); labels follow the sweep's (``nft[mixup=False]``)."""
    from benchmarks.grid import load_sweep, named_entry

    entries = [named_entry(e, "defence", "defenses", []) for e in load_sweep(config).get("defenses") or []]
    out = [(name, params) for name, params in filter(None, entries) if name != "none"]
    if not out:
        raise ValueError(f"{config}: no defences to time in its 'defenses:' list")
    return out


def parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``DEFENCE.KEY=VALUE`` items -> {defence: {key: value}}."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        head, sep, value = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not sep or not dot:
            raise ValueError(f"--set expects DEFENCE.KEY=VALUE (e.g. nft.steps=50), got {item!r}")
        out.setdefault(name.strip(), {})[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = ["| defence | options | time (s) | x NFT |", "|---|---|---|---|"]
    for r in result["defenses"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        t = f"{r['time_s']:.3f}" if "time_s" in r else f"error: {r['error']}"
        ratio = "-" if r["ratio_to_nft"] is None else f"{r['ratio_to_nft']:.2f}"
        lines.append(f"| {r['defense']} | {opts} | {t} | {ratio} |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    v, tr = result["victim"], result["training"]
    lines = [
        f"nftbench perf: {result['task']}/{result['dataset']} {result['model']} ({result['scale']} scale), "
        f"attack {result['attack']}, victim {v['victim_id']}, seed {result['seed']}",
        f"device: {result['device']}",
        f"clean split: {result['budget']} ({result['clean_samples']} samples); test data: not used",
        f"mode: {result['mode']}",
        f"victim training: {tr['images_per_s']:.1f} images/s ({tr['steps']} timed steps of batch {tr['batch_size']} "
        f"after {tr['warmup_steps']} warm-up steps, {tr['seconds']:.2f} s; {tr['torch_threads']} torch thread(s), "
        f"{tr['precision']})"
        + ("" if not v.get("recorded_train_images_per_s") else
           f"; recorded when the victim was trained: {v['recorded_train_images_per_s']:.1f} images/s"),
        f"defence wall time: median of {result['repeats']} run(s) each, on a copy of the victim",
        "",
        format_table(result),
    ]
    return "\n".join(lines) + "\n"


def run_perf(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "compile", None):
        os.environ["NFTBENCH_COMPILE"] = "1"
    if args.repeats < 1 or (args.train_steps is not None and args.train_steps < 1) or args.quick_factor <= 0:
        raise ValueError("--repeats and --train-steps must be >= 1 and --quick-factor > 0")
    sets = parse_sets(args.set)
    if args.variants:
        if args.defenses:
            raise ValueError("--variants and --defenses choose the defences two ways; give one")
        chosen = sweep_variants(args.variants)
    else:
        names = [d.strip() for d in args.defenses.split(",") if d.strip()] if args.defenses else \
            sorted((n for n in DEFENSES.names() if n != "none"), key=lambda n: (n != "nft", n))
        chosen = [(n, {}) for n in names]
    for name in list(sets) + [n for n, _ in chosen]:
        DEFENSES.get(name)  # unknown names fail before any work
    runs = []
    for name, params in chosen:
        options = {**(quick_options(name, args.quick_factor) if args.quick else {}), **params, **sets.get(name, {})}
        if args.quick:  # a variant's own step count is scaled like the defaults, so ratios keep their meaning
            options.update({f: max(1, round(params[f] * args.quick_factor)) for f in step_fields(name) if f in params})
        DEFENSES.get(name).make_config(options)  # bad options fail before any work
        runs.append((params_label(name, params), name, options))
    if args.per_class is not None:
        budget = CleanBudget(fraction=None, per_class=args.per_class)
    else:
        budget = CleanBudget(fraction=args.val_frac)
    attack = None if args.attack == "none" else create_attack(args.attack, seed=args.seed)
    task = create_task(args.task, dataset=args.dataset, model=args.model, scale=args.scale, data_root=args.data_root,
                       cache_dir=args.runs_dir, device=args.device, download=args.download)
    train_steps = args.train_steps if args.train_steps is not None else (10 if args.quick else 50)
    warmup = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 10)

    print("perf: victim (cached, or trained now)", file=sys.stderr, flush=True)
    model, victim, vdir = get_victim(task, attack, args.seed, args.runs_dir, getattr(args, "max_steps", None))
    clean = task.clean_split(budget, args.seed)
    print(f"perf: training throughput ({warmup} warm-up + {train_steps} timed steps)", file=sys.stderr, flush=True)
    training = training_throughput(task, attack, args.seed, train_steps, warmup)
    print(f"perf: defences {', '.join(label for label, _, _ in runs)}", file=sys.stderr, flush=True)
    rows = time_defenses(task, model, clean, runs, args.seed, args.repeats)

    changed = "; ".join(f"{label} " + ", ".join(f"{k}={v}" for k, v in options.items())
                        for label, _, options in runs if options)
    if args.quick:
        mode = f"--quick: step counts x{args.quick_factor:g} of the defaults ({changed or 'nothing to scale'})"
    else:
        mode = "defaults: each defence's default (paper) options" + (f", except {changed}" if changed else "")
    result = {
        "task": args.task, "dataset": args.dataset, "model": task.config().get("model"), "scale": args.scale,
        "attack": args.attack, "seed": args.seed, "budget": budget.describe(), "clean_samples": task.split_sizes(clean),
        "device": device_name(task.device), **numerics(task), "mode": mode, "quick": args.quick,
        "repeats": args.repeats,
        "victim": {"victim_id": victim["victim_id"], "dir": str(vdir),
                   "recorded_train_images_per_s": victim.get("train_images_per_s")},
        "training": training, "defenses": rows, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="image")
    p.add_argument("--dataset", default=None, help="default: the task's embedded dataset")
    p.add_argument("--model", default=None, help="default: the dataset's model for --scale")
    p.add_argument("--scale", default="quick", choices=["quick", "fast", "paper"])
    p.add_argument("--attack", default=None, help="the victim's attack, or 'none' (default: the task's, e.g. badnets)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--val-frac", type=float, default=0.01, help="clean data as a fraction of train (default 0.01)")
    g.add_argument("--per-class", type=int, default=None, help="clean samples per class")
    p.add_argument("--defenses", default=None,
                   help="comma-separated defences to time (default: every registered one except 'none')")
    p.add_argument("--variants", default=None, metavar="CONFIG",
                   help="time the defence entries of a sweep config instead (e.g. nft-ablations: every NFT variant "
                        "side by side on one victim)")
    p.add_argument("--quick", action="store_true",
                   help="scale every defence's step counts by --quick-factor (for CPU); stated in the output")
    p.add_argument("--quick-factor", type=float, default=0.1, help="step-count factor of --quick (default 0.1)")
    p.add_argument("--set", action="append", metavar="DEFENCE.KEY=VALUE",
                   help="a defence option, repeatable (e.g. nft.steps=200); applied after --quick")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 50; --quick 10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 10; --quick 2)")
    add_gpu_arguments(p)
    p.add_argument("--repeats", type=int, default=1, help="runs per defence; the median is reported (default 1)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    add_precision(p)
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: $DATA_ROOT or ./data)")
    p.add_argument("--runs-dir", default="runs", help="cache of decoded datasets and victims")
    p.add_argument("--download", action="store_true", help="allow downloading a missing dataset")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.precision:
            set_precision(args.precision)
        run_perf(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nftbench perf: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
