"""make bench's comparison of a fresh run with the committed reference (benchmarks/compare.py)."""

import csv
import shutil
from pathlib import Path

from benchmarks.compare import compare

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "quick"


def test_identical_runs_flag_nothing_and_a_shift_beyond_the_tolerance_is_flagged(tmp_path):
    table, flagged = compare(REFERENCE, REFERENCE)
    assert flagged == 0 and "8 cells computed, 0 flagged" in table
    shutil.copy(REFERENCE / "results.csv", tmp_path / "results.csv")
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    rows[1]["asr_after"] = str(float(rows[1]["asr_after"]) - 0.025)  # 2.5 points
    rows[3]["asr_after"] = str(float(rows[3]["asr_after"]) - 0.015)  # 1.5 points: within 2
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table, flagged = compare(tmp_path, REFERENCE)
    assert flagged == 1 and "**differs: ASR -2.50**" in table
    assert compare(tmp_path, REFERENCE, tolerance_pp=3.0)[1] == 0
