"""A fresh run of a preset beside its committed reference (``make bench``): metrics side by side, cells flagged
where a metric differs by more than a tolerance.

The same seed on another CPU, thread count or torch build gives slightly different floating-point sums, so a few
test predictions can flip: on digits (540 test images) one image is 0.19 percentage points. The default tolerance,
2 points on C-ACC, ASR, RA and DER, allows about ten flipped images; wall times are shown, never flagged.
"""

from __future__ import annotations

import csv
from pathlib import Path

METRICS = (("clean_acc_after", "C-ACC"), ("asr_after", "ASR"), ("ra_after", "RA"), ("der", "DER"))
DEFAULT_TOLERANCE_PP = 2.0


def read_rows(folder: str | Path) -> dict[str, dict[str, str]]:
    path = Path(folder) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give a sweep or bench --out folder")
    with open(path, newline="") as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


def _pct(v: str | None) -> float | None:
    return None if v in (None, "") else 100 * float(v)


def compare(fresh: str | Path, reference: str | Path, tolerance_pp: float = DEFAULT_TOLERANCE_PP
            ) -> tuple[str, int]:
    """A markdown table of ``fresh`` beside ``reference`` (rows matched by run id) and the number of flagged cells."""
    new, ref = read_rows(fresh), read_rows(reference)
    head = ["attack", "defence", "clean data"] + [f"{label} new / ref" for _, label in METRICS] + ["time (s) new / ref",
                                                                                                    "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = 0
    for run_id, r in new.items():
        old = ref.get(run_id)
        cells, bad = [r["attack"], r["defense"], r["budget"]], []
        for key, label in METRICS:
            a, b = _pct(r.get(key)), _pct(old.get(key)) if old else None
            cells.append(f"{'-' if a is None else f'{a:.2f}'} / {'-' if b is None else f'{b:.2f}'}")
            if a is not None and b is not None and abs(a - b) > tolerance_pp:
                bad.append(f"{label} {a - b:+.2f}")
        t_new, t_old = r.get("defense_time_s"), old.get("defense_time_s") if old else ""
        cells.append(f"{float(t_new):.1f} / {float(t_old):.1f}" if t_new and t_old else f"{t_new or '-'} / -")
        if r["status"] != "ok":
            bad.append(f"status {r['status']}")
        check = "no reference" if old is None else ("**differs: " + ", ".join(bad) + "**" if bad else "ok")
        flagged += bool(bad) or old is None
        lines.append("| " + " | ".join(cells + [check]) + " |")
    missing = [k for k in ref if k not in new]
    summary = (f"\n{len(new)} cells computed, {flagged} flagged (tolerance {tolerance_pp:g} percentage points on "
               f"C-ACC, ASR, RA, DER; times are this machine's)" + (f"; {len(missing)} reference cells not run"
                                                                    if missing else "") + "\n")
    return "\n".join(lines) + "\n" + summary, flagged
