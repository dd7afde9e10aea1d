"""``make gpu-check``: what one GPU does with this suite, in about ten minutes (issue 21).

``python -m benchmarks.gpu_check [--device cuda|cpu]``:

1. prints torch, CUDA, cuDNN and device versions;
2. victim-training throughput (``benchmarks.perf.training_throughput``: the recipe's optimiser, schedule,
   augmentation and precision) of the paper recipe's model (PreAct-ResNet-18 on CIFAR-10) and of the fast scale's
   airbench, each a few hundred steps;
3. trains a paper-recipe BadNets victim capped at ``victim_steps`` steps (``--max-steps``: cached under its own id,
   never mistaken for a full victim) and times NFT, ANP and I-BAU at their paper defaults on it;
4. runs one short NFT purification through the sweep executor (``run_sweep``) in a private runs folder, where that
   capped victim stands in for the sweep's victim (the executor is what is checked, not the victim);
5. samples GPU utilisation (``nvidia-smi``, else ``torch.cuda.utilization``) twice a second during each phase;
6. writes everything to ``results/perf/gpu-check-<device>.json``.

``--device cpu`` runs the same steps on the embedded digits data with tiny caps (seconds), so the script is
exercised by the test suite and cannot rot. Numbers from a CPU run say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks import create_attack
from benchmarks.perf import time_defenses, training_throughput
from benchmarks.run import Paths
from common.checkpoint import save_checkpoint
from common.environment import device_name, versions
from tasks import CleanBudget, create_task
from training.victims import get_victim, victim_config, victim_dir


@dataclass(frozen=True)
class CheckPlan:
    """What one gpu-check runs: the dataset, the (scale, model, timed steps, warm-up steps) whose training
    throughput is measured, the capped victim, the defences' options and the sweep cell's NFT steps."""

    dataset: str
    throughput: tuple[tuple[str, str | None, int, int], ...]
    victim_steps: int
    defenses: tuple[tuple[str, dict[str, Any]], ...]
    sweep_nft_steps: int
    budget: CleanBudget


PLANS = {
    # one H100: ~300 paper steps and ~100 airbench steps of throughput, a 300-step victim, the defences at their
    # paper defaults (NFT 1000 steps, ANP 2000 iterations, I-BAU 5 rounds), a 200-step NFT sweep cell
    "cuda": CheckPlan("cifar10", (("paper", None, 300, 30), ("fast", None, 100, 10)), 300,
                      (("nft", {}), ("anp", {}), ("i-bau", {})), 200, CleanBudget(fraction=0.01)),
    # the test suite's: digits, a few steps each (the structure of the GPU run, none of its numbers)
    "cpu": CheckPlan("digits", (("paper", None, 2, 1), ("fast", "airbench", 2, 1)), 3,
                     (("nft", {"steps": 2}), ("anp", {"iterations": 2}), ("i-bau", {"rounds": 1})), 2,
                     CleanBudget(fraction=None, per_class=2)),
}


class Utilisation:
    """Mean GPU utilisation (%) over a ``with`` block, sampled every ``period`` s; ``None`` without a GPU reader."""

    def __init__(self, device: torch.device, period: float = 0.5):
        self.device, self.period = device, period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float | None:
        if self.device.type != "cuda":
            return None
        index = self.device.index or 0
        if shutil.which("nvidia-smi"):
            out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return float(out.stdout.strip().splitlines()[0])
        try:
            return float(torch.cuda.utilization(index))
        except Exception:  # noqa: BLE001  (no pynvml / amdsmi: no reading)
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            value = self.read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> Utilisation:
        if self.read() is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def environment(device: torch.device) -> dict[str, Any]:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "device": device_name(device), "versions": versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update({"capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


def plant_sweep_victim(task: Any, attack: Any, seed: int, model: torch.nn.Module, meta: dict[str, Any],
                       runs_dir: Path) -> Path:
    """The capped victim saved as the sweep's (uncapped) victim of (task, attack, seed) in the private ``runs_dir``,
    marked ``stand_in`` in its victim.json, so the sweep loads it instead of training a full one."""
    config = victim_config(task, attack, seed)
    d = victim_dir(runs_dir, config)
    save_checkpoint(d, model, {**meta, "victim_id": d.name, "config": config,
                               "stand_in": f"gpu-check: the victim capped at {meta['config']['max_steps']} steps"},
                    sidecar_name="victim.json")
    return d


def run_check(device: str = "cuda", data_root: str | None = None, runs_dir: str = "runs",
              out_dir: str = "results/perf", seed: int = 0) -> dict[str, Any]:
    plan = PLANS["cpu" if device == "cpu" else "cuda"]
    dev = torch.device(device)
    log = lambda msg: print(f"gpu-check: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict[str, Any] = {"environment": environment(dev), "dataset": plan.dataset, "seed": seed,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    log(json.dumps({k: v for k, v in result["environment"].items() if k != "versions"}))
    attack = create_attack("badnets", seed=seed)
    start = time.perf_counter()

    result["training"] = []
    for scale, model, steps, warmup in plan.throughput:
        task = create_task("image", dataset=plan.dataset, model=model, scale=scale, data_root=data_root,
                           cache_dir=runs_dir, device=device)
        log(f"training throughput, {scale} recipe, {task.model_name}: {warmup} warm-up + {steps} timed steps")
        with Utilisation(dev) as util:
            row = training_throughput(task, attack, seed, steps, warmup)
        result["training"].append({"scale": scale, "model": task.model_name, **row, "gpu_util_pct": util.mean})
        log(f"  {row['images_per_s']:.0f} images/s (batch {row['batch_size']}, {row['precision']})")

    task = create_task("image", dataset=plan.dataset, scale="paper", data_root=data_root, cache_dir=runs_dir,
                       device=device)
    log(f"paper-recipe {task.model_name} victim capped at {plan.victim_steps} steps (cached under its own id)")
    t0 = time.perf_counter()
    with Utilisation(dev) as util:
        model, meta, _ = get_victim(task, attack, seed, runs_dir, max_steps=plan.victim_steps)
    result["victim"] = {"model": task.model_name, "max_steps": plan.victim_steps, "victim_id": meta["victim_id"],
                        "seconds_incl_load_or_train": round(time.perf_counter() - t0, 2),
                        "recorded_train_images_per_s": meta.get("train_images_per_s"), "gpu_util_pct": util.mean}
    clean = task.clean_split(plan.budget, seed)
    log(f"defences on it: {', '.join(n for n, _ in plan.defenses)} ({task.split_sizes(clean)} clean samples)")
    with Utilisation(dev) as util:
        rows = time_defenses(task, model, clean, [(n, n, o) for n, o in plan.defenses], seed)
    result["defenses"] = {"budget": plan.budget.describe(), "rows": rows, "gpu_util_pct": util.mean}

    from benchmarks.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        private = Path(tmp) / "runs"
        private.mkdir()
        if (Path(runs_dir) / "datasets").is_dir():  # decoded once, shared
            (private / "datasets").symlink_to((Path(runs_dir) / "datasets").resolve())
        plant_sweep_victim(task, attack, seed, model, meta, private)
        budget = {"per_class": plan.budget.per_class} if plan.budget.per_class else {"val_frac": plan.budget.fraction}
        grid = {"name": "gpu-check", "task": "image", "scale": "paper", "datasets": [plan.dataset],
                "attacks": ["badnets"], "defenses": [{"name": "nft", "steps": plan.sweep_nft_steps}],
                "budgets": [budget], "seeds": [seed]}
        log(f"one NFT cell ({plan.sweep_nft_steps} steps) through the sweep executor")
        t0 = time.perf_counter()
        with Utilisation(dev) as util:
            swept = run_sweep(grid, Path(tmp) / "sweep", Paths(runs_dir=private, data_root=data_root, device=device),
                              log=lambda _msg: None)
        record = swept.df.iloc[0].to_dict()
        result["sweep"] = {"status": record["status"], "seconds": round(time.perf_counter() - t0, 2),
                           "nft_steps": plan.sweep_nft_steps, "gpu_util_pct": util.mean,
                           "error": record.get("error") if isinstance(record.get("error"), str) else None}
    result["total_s"] = round(time.perf_counter() - start, 1)
    name = result["environment"]["device"].lower()
    slug = "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    path = Path(out_dir) / f"gpu-check-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(summary(result, path))
    return result


def summary(result: dict[str, Any], path: Path) -> str:
    env = result["environment"]

    def util(v: float | None) -> str:
        return "n/a" if v is None else f"{v}%"

    lines = [f"gpu-check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
             f"{result['dataset']}, {result['total_s']} s in all -> {path}"]
    for t in result["training"]:
        lines.append(f"  train {t['scale']:>5} {t['model']:<16} {t['images_per_s']:>9.1f} images/s  "
                     f"({t['steps']} steps of {t['batch_size']}, {t['precision']}, GPU util {util(t['gpu_util_pct'])})")
    for r in result["defenses"]["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "paper defaults"
        t = f"{r['time_s']:.2f} s" if "time_s" in r else r["error"]
        lines.append(f"  {r['defense']:<6} ({opts}) {t}")
    lines.append(f"  defences' GPU util {util(result['defenses']['gpu_util_pct'])}")
    s = result["sweep"]
    lines.append(f"  sweep: one NFT cell ({s['nft_steps']} steps) {s['status']} in {s['seconds']} s, "
                 f"GPU util {util(s['gpu_util_pct'])}"
                 + (f": {s['error']}" if s.get("error") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: digits, tiny caps; default cuda)")
    p.add_argument("--data-root", default=None, help="folder holding CIFAR-10 (default: $DATA_ROOT or ./data)")
    p.add_argument("--runs-dir", default="runs", help="cache of decoded datasets and (capped) victims")
    p.add_argument("--out", default="results/perf", help="folder of gpu-check-<device>.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible; run `make gpu-check DEVICE=cpu` for the CPU smoke run",
              file=sys.stderr)
        sys.exit(2)
    run_check(args.device, args.data_root, args.runs_dir, args.out, args.seed)


if __name__ == "__main__":
    main()
