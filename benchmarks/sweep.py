"""Sweeps: a YAML grid of cells (tasks x datasets x models x attacks x defences x clean budgets x seeds).

A sweep is validated, planned, executed and collected, each step in its own module:

1. **Load and validate** (``benchmarks.grid``: ``load_sweep`` + ``expand``): every problem of the grid is collected
   into one ``SweepConfigError`` that names each fix, before any work starts.
2. **Plan** (``benchmarks.plan``: ``plan_sweep``): each cell is resolved to its run config
   (``benchmarks.run.run_config``) and its run id, the hash of that config. A cell with an ``ok`` record in
   ``<out>/records`` is done and is skipped; one with an ``ok`` record in a ``--reuse`` folder is copied in with a
   ``copied_from`` field; ``--only`` leaves the cells it does not match to other invocations. A dry run stops here,
   printing the plan and its ESTIMATE.
3. **Execute** (``benchmarks.executors``): ``local`` (in-process, or one spawned worker process per visible GPU) or
   ``ray`` (one Ray task per cell). A cell that raises becomes a record with ``status: error``; the sweep goes on.
   Victims are shared through the victim cache, which a per-victim file lock keeps from being trained twice at once.
4. **Collect** (``benchmarks.sweep_outputs``): ``<out>/results.csv`` is rebuilt from the records after every cell
   and at the end, then ``<out>/table.md`` (the grid's cells).

Each cell's stdout, stderr and logging go to ``<out>/logs/<run_id>.log``. A sweep killed at any point
(even SIGKILL) is resumed by running it again: finished cells are skipped, the interrupted one reruns. A cell is
claimed before it runs (``execute_cell``), so sweeps of one grid running at once into one folder run each cell
once, each cell's log holding one process's output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.executors import execute_cell, resolve_workers, run_local, run_ray
from benchmarks.grid import expand, grid_data_root, load_sweep
from benchmarks.plan import Plan, describe_plan, device_kind, estimate, parse_only, plan_sweep, select_cells
from benchmarks.records import write_record
from benchmarks.run import Paths
from benchmarks.sweep_outputs import Collector, clean_stale_temp_files, rebuild_csv, retryable, write_table


@dataclass
class SweepResult:
    """A finished sweep: its plan, the grid's rows of ``results.csv`` (a DataFrame) and its markdown table."""

    plan: Plan
    df: Any
    table: str

    @property
    def failed(self) -> int:
        return int((self.df.status != "ok").sum()) if len(self.df) else 0

    @property
    def to_fix(self) -> int:
        """Failed cells that a rerun alone cannot fix (:func:`retryable`)."""
        failed = self.df[self.df.status != "ok"] if len(self.df) else self.df
        return sum(not retryable(str(e)) for e in failed.error) if len(failed) else 0


def run_sweep(config: str | os.PathLike | dict[str, Any], out: str | os.PathLike, paths: Paths,
              executor: str = "local", workers: int | str | None = 1, address: str | None = None,
              dry_run: bool = False, log: Callable[[str], None] = print,
              reuse: Sequence[str | os.PathLike] = (), only: Sequence[str] = ()) -> SweepResult | Plan:
    """Validate, plan and run a sweep; return the plan (``dry_run``) or the results. ``reuse``: other sweeps'
    output folders whose ``ok`` records of the same run id are copied in instead of rerun. ``only``: ``KEY=VALUE``
    filters (``parse_only``); the other cells are left to other invocations, which may run at the same time into
    the same folder (the run ids, records and CSV are those of the whole grid)."""
    grid = config if isinstance(config, dict) else load_sweep(config)
    if isinstance(config, dict):
        expand(grid)  # validate before any work
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    out = Path(out)
    paths = grid_data_root(grid, paths)
    if executor == "local":
        n_workers = resolve_workers(workers, paths.device)
    else:  # Ray decides; the estimate assumes --workers (or 1) cells at a time
        n_workers = int(workers) if isinstance(workers, int) or str(workers).isdigit() else 1
    for r in map(Path, reuse):
        if not (r / "records").is_dir():
            raise FileNotFoundError(f"--reuse {r}: no records/ folder there; give a sweep's --out folder")
    filters = parse_only(only)
    plan = plan_sweep(grid, out, paths, log=log, reuse=[Path(r) for r in reuse])
    left_out = select_cells(plan, filters)
    if left_out:
        plan.notes.append(f"{left_out} cell(s) not done yet are outside --only {' '.join(only)}; not run here")
    if dry_run:
        log(describe_plan(plan, estimate(plan, device_kind(paths.device), n_workers)))
        return plan
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out)
    for cell in plan.cells:
        if cell.status == "reuse":
            record = json.loads(cell.source.read_text())
            write_record(out / "records" / f"{cell.run_id}.json", {**record, "copied_from": str(cell.source)})
            cell.status = "done"
    todo = plan.todo()
    done = sum(c.status == "done" for c in plan.cells)
    log(f"sweep {plan.name}: {len(plan.cells)} cells, {done} done (skipped), {len(todo)} to run -> {out}")
    for n in plan.notes:
        log(f"note: {n}")
    collect = Collector(plan, out)
    rebuild_csv(out, [c.run_id for c in plan.cells])
    for cell in todo:  # nothing to run for these: record the error (a row in the CSV), the sweep goes on
        if cell.status == "unresolved":
            collect(cell, execute_cell(cell, paths, out))
    todo = [c for c in todo if c.status == "todo"]
    if executor == "ray":
        run_ray(todo, paths, out, address, collect)
    else:
        run_local(todo, paths, out, n_workers, collect)
    rebuild_csv(out, [c.run_id for c in plan.cells])
    df, table = write_table(plan, out)
    log(table)
    return SweepResult(plan, df, table)


__all__ = ["SweepResult", "run_sweep"]
