"""Executing a sweep's cells: one cell claimed and run with its output captured to its log (``execute_cell``), and
the executors that run many: ``local`` (in-process, or one spawned worker process per visible GPU, each pinned with
``CUDA_VISIBLE_DEVICES``) and ``ray`` (one Ray task per cell: ``num_gpus=1`` when the cluster has GPUs, ``num_cpus=1``
otherwise).

A cell that raises (missing data, NaN, out of memory, a dead worker) becomes a record with ``status: error``; the
sweep goes on. Each finished record is handed to a ``collect`` callback in the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.interrupts import INTERRUPTED
from benchmarks.plan import Cell, record_status, victim_key
from benchmarks.records import write_record
from benchmarks.run import Paths, run_once
from common.checkpoint import atomic_write_text
from common.environment import versions
from common.fileio import file_lock
from common.guards import quiet
from common.precision import PRECISION_ENV, get_precision

# Receives each finished cell and its record, in the driver (``benchmarks.sweep_outputs.Collector``).
Collect = Callable[[Cell, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------------- one cell
@contextlib.contextmanager
def capture_to(log_path: Path) -> Iterator[None]:
    """Send this cell's stdout, stderr and logging (INFO and up) to ``log_path`` (appended, one header per try)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as f:
        f.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()} ===\n")
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(min(level, logging.INFO) if level else logging.NOTSET)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


def error_record(cell: Cell, error: str, tb: str | None = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {"run_id": cell.run_id, "status": "error", "config": cell.config, "victim_id": cell.victim_id,
              "error": error, "versions": versions(), "started": now, "finished": now}
    if tb:
        record["traceback"] = tb
    return record


def execute_cell(cell: Cell, paths: Paths, out: Path, wait: bool = True) -> dict[str, Any] | None:
    """Run one cell with its output captured; write and return its record (``status: error`` if it raised).

    The cell is claimed first (an exclusive lock on ``<out>/claims/<run_id>.lock``), so sweeps of one grid running
    at once into one folder run each cell once and never share a log: a cell another process holds is waited for
    (``wait``) or left, returning None. A claim dies with its process (even on SIGKILL), so a killed sweep's cells
    are free again at once. A cell whose ``ok`` record exists when the claim is taken is not run again.
    """
    records = out / "records"
    with file_lock(out / "claims" / f"{cell.run_id}.lock", blocking=wait) as claimed:
        if not claimed:
            return None
        if record_status(records, cell.run_id) == "ok":  # another process ran it since this one planned
            return json.loads((records / f"{cell.run_id}.json").read_text())
        return run_claimed_cell(cell, paths, out)


def run_claimed_cell(cell: Cell, paths: Paths, out: Path) -> dict[str, Any]:
    records = out / "records"
    written = False  # run_once writes the record of a cell it ran; anything else is written below
    with capture_to(out / "logs" / f"{cell.run_id}.log"):
        print(f"cell {cell.run_id}: {cell.label()}")
        if cell.status == "unresolved":
            record = error_record(cell, cell.error or "unresolved")
            print(f"error: {record['error']}")
        else:
            try:
                record = run_once(cell.cfg, paths, results_csv=None, records_dir=records, skip_done=True)
                written = True
            except Exception as e:  # noqa: BLE001  (recorded: a failed cell is a row, never a silent gap)
                if INTERRUPTED.is_set():
                    raise KeyboardInterrupt from e
                traceback.print_exc()
                record = error_record(cell, f"{type(e).__name__}: {e}", traceback.format_exc(limit=8))
            if record.get("run_id") != cell.run_id:  # the data changed since planning: keep the planned id too
                print(f"warning: run id {record.get('run_id')} differs from the planned {cell.run_id}")
                record = {**record, "run_id": cell.run_id, "resolved_run_id": record.get("run_id")}
                written = False
            if record.get("status") != "ok":
                print(f"error: {record.get('error')}")
            else:
                after, info = record.get("after") or {}, record.get("defense_info") or {}
                print(f"after: {json.dumps(after)}  der {record.get('der')}  defence {info.get('wall_time_s', 0):.1f}s")
        print(f"status: {record['status']}")
    if not written:
        write_record(records / f"{cell.run_id}.json", record)
    return record


# --------------------------------------------------------------------------------------------------- executors
_WORKER: dict[str, Any] = {"slot": 0, "bar": None}


def _init_worker(slots: Any, gpus: list[str], threads: int, bar_lock: Any) -> None:
    """Runs once in each spawned worker: take a slot, pin its GPU, size its CPU threads, open its progress line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops the workers (run_local)
    slot = slots.get()
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    tqdm.set_lock(bar_lock)  # the driver's: a worker stopped mid-cell leaves no lock of its own behind
    _WORKER["slot"] = slot
    _WORKER["bar"] = tqdm(desc=f"worker {slot}", position=slot + 1, unit="cell", disable=quiet(), leave=False,
                          file=sys.stderr, dynamic_ncols=True)
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _WORKER["bar"].close, exitpriority=10)  # clear the line when the pool ends


def _worker_cell(cell: Cell, paths: Paths, out: str, wait: bool) -> dict[str, Any] | None:
    bar = _WORKER["bar"]
    if bar is not None:
        bar.set_description_str(f"worker {_WORKER['slot']}: {cell.label()}")
    record = execute_cell(cell, paths, Path(out), wait)
    if bar is not None and record is not None:
        bar.update()
    return record


def _ray_cell(cell: Cell, paths: Paths, out: str, wait: bool) -> tuple[dict[str, Any] | None, str]:
    record = execute_cell(cell, paths, Path(out), wait)
    log = Path(out) / "logs" / f"{cell.run_id}.log"
    return record, log.read_text() if record is not None and log.is_file() else ""


def visible_gpus() -> list[str]:
    """GPU ids a worker can be pinned to: those of ``CUDA_VISIBLE_DEVICES`` if set, else ``0..count-1``."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_workers(workers: int | str | None, device: str) -> int:
    """``auto``: one worker per visible GPU (when the device may be a GPU), else 1."""
    if workers in (None, "auto"):
        return max(1, len(visible_gpus())) if device in ("auto", "cuda") else 1
    n = int(workers)
    if n < 1:
        raise ValueError(f"--workers must be >= 1 or 'auto', got {workers}")
    return n


class VictimQueue:
    """The cells still to hand out, by victim: :meth:`pop` gives the first cell (in plan order) of a victim no worker
    is on, so N workers start on N victims (a victim is trained once, under a lock; a second worker on it would
    wait) and each victim's cells still run in order; only when every victim left is busy does a victim get a
    second worker, which then shares its trained copy."""

    def __init__(self, cells: list[Cell]):
        self.by_victim: dict[str, deque[Cell]] = {}
        for cell in cells:
            self.by_victim.setdefault(victim_key(cell), deque()).append(cell)
        self.busy: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return any(self.by_victim.values())

    def pop(self) -> Cell:
        waiting = [k for k, q in self.by_victim.items() if q]
        key = next((k for k in waiting if not self.busy[k]), waiting[0])
        self.busy[key] += 1
        return self.by_victim[key].popleft()

    def done(self, cell: Cell) -> None:
        self.busy[victim_key(cell)] -= 1


def run_local(todo: list[Cell], paths: Paths, out: Path, workers: int, collect: Collect) -> None:
    """In-process and sequential (workers=1), or one spawned worker process per slot, each pinned to a GPU (slot
    modulo the visible GPUs: N workers on one GPU share it), handed cells victim by victim (:class:`VictimQueue`).
    Cells another sweep has claimed are left for last, then waited for (their record is taken as it is)."""
    from tqdm.auto import tqdm

    if not todo:
        return
    workers = min(workers, len(todo))
    if workers == 1:
        bar = tqdm(total=len(todo), desc="worker 0", position=0, unit="cell", disable=quiet(), dynamic_ncols=True)
        claimed_elsewhere = []
        for wait, cells in ((False, todo), (True, claimed_elsewhere)):
            for cell in cells:
                bar.set_description_str(f"worker 0: {cell.label()}")
                record = execute_cell(cell, paths, out, wait)
                if record is None:
                    claimed_elsewhere.append(cell)
                    continue
                collect(cell, record)
                bar.update()
        bar.close()
        return

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
    from concurrent.futures import wait as wait_for

    ctx = mp.get_context("spawn")  # no CUDA state or threads inherited from the driver
    slots = ctx.Queue()
    for i in range(workers):
        slots.put(i)
    gpus = visible_gpus() if paths.device in ("auto", "cuda") else []
    wpaths = Paths(runs_dir=paths.runs_dir, data_root=paths.data_root, device="cuda" if gpus else paths.device,
                   download=paths.download)
    threads = max(1, (os.cpu_count() or 1) // workers)
    total = tqdm(total=len(todo), desc="sweep", position=0, unit="cell", disable=quiet(), dynamic_ncols=True)
    queue = VictimQueue(todo)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, gpus, threads, ctx.RLock())) as pool:
        try:
            pending: dict[Any, tuple[Cell, bool]] = {}

            def submit(cell: Cell, wait: bool) -> None:
                pending[pool.submit(_worker_cell, cell, wpaths, str(out), wait)] = (cell, wait)

            while len(pending) < workers and queue:
                submit(queue.pop(), False)
            while pending:
                finished, _ = wait_for(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cell, waited = pending.pop(fut)
                    if not waited:
                        queue.done(cell)
                    try:
                        record = fut.result()
                    except Exception as e:  # noqa: BLE001  (a worker that died: out of memory, killed, ...)
                        record = error_record(cell, f"worker failed: {type(e).__name__}: {e}")
                    if record is None:  # claimed by another sweep: wait for it behind the other cells
                        submit(cell, True)
                        continue
                    collect(cell, record)
                    total.update()
                while len(pending) < workers and queue:
                    submit(queue.pop(), False)
        except KeyboardInterrupt:  # stop the workers now; their unfinished cells leave no record and rerun
            pool.shutdown(wait=False, cancel_futures=True)
            for child in mp.active_children():
                child.terminate()
            raise
    total.close()


def run_ray(todo: list[Cell], paths: Paths, out: Path, address: str | None, collect: Collect) -> None:
    """One Ray task per cell: ``num_gpus=1`` when the cluster has GPUs (Ray pins each task's GPU with
    ``CUDA_VISIBLE_DEVICES``), else ``num_cpus=1``. Uses the running Ray instance if ``ray.init`` was called,
    else connects to ``address`` (``auto``: the cluster this node belongs to) or starts a local instance."""
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'nftbench[dist]' (or pip install ray)") from e
    from tqdm.auto import tqdm

    if not todo:
        return
    started = False
    if not ray.is_initialized():
        if address in (None, "", "local"):
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        # a cluster's workers do not inherit this process's environment: hand them the precision setting
        env = {"env_vars": {PRECISION_ENV: get_precision()}}
        remote = ray.remote(max_retries=1, runtime_env=env, **options)(_ray_cell)
        wpaths = paths if not gpus or paths.device != "auto" else Paths(
            runs_dir=paths.runs_dir, data_root=paths.data_root, device="cuda", download=paths.download)
        pending = {remote.remote(cell, wpaths, str(out), False): cell for cell in todo}
        bar = tqdm(total=len(todo), desc="sweep (ray)", unit="cell", disable=quiet(), dynamic_ncols=True)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    record, log = ray.get(ref)
                    if record is None:  # claimed by another sweep: wait for it behind the other cells
                        pending[remote.remote(cell, wpaths, str(out), True)] = cell
                        continue
                    log_path = out / "logs" / f"{cell.run_id}.log"
                    if log and not log_path.is_file():
                        atomic_write_text(log_path, log)
                except Exception as e:  # noqa: BLE001  (worker crashed, node lost, ...)
                    record = error_record(cell, f"ray task failed: {type(e).__name__}: {e}")
                collect(cell, record)
                bar.update()
                if not quiet():
                    bar.write(f"[{record['status']}] {cell.run_id} {cell.label()}")
        bar.close()
    finally:
        if started:
            ray.shutdown()

