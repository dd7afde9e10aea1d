"""Leaderboard aggregation (synthetic records) and a perf smoke run on digits."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from benchmarks.leaderboard import build_leaderboard


def make_record(defense: str, seed: int, acc: float, asr: float, ra: float, secs: float, *, budget: str = "0.01",
                clean_samples: int = 13, attack: str | None = "badnets", status: str = "ok") -> dict:
    before = {"clean_acc": 0.99, "asr": 1.0 if attack else None, "ra": 0.0 if attack else None}
    record = {
        "run_id": f"{defense}-{attack}-{budget}-{seed}-{status}".replace("/", "_"), "status": status,
        "config": {
            "task": {"task": "image", "dataset": "digits", "model": "resnet-tiny", "scale": "quick"},
            "attack": {"name": attack, "target": 0, "poison_rate": 0.1, "seed": seed} if attack else None,
            "defense": defense, "defense_params": {}, "budget": budget, "seed": seed,
        },
        "victim_id": f"v{seed}", "before": before, "device": "cpu (2 cores, 2 threads)",
        "finished": "2026-01-01T00:00:00+0000",
    }
    if status != "ok":
        record.update(error="NonFiniteLossError: nft: loss is nan at step 3", traceback="...")
        return record
    record.update(clean_samples=clean_samples, defense_info={"defense": defense, "wall_time_s": secs},
                  after={"clean_acc": acc, "asr": asr, "ra": ra})
    if attack:
        record["der"] = (max(0.0, 1.0 - asr) - max(0.0, 0.99 - acc) + 1) / 2
    return record


def write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['run_id']}.json").write_text(json.dumps(record))


CELLS = {  # (defence, seed) -> (C-ACC, ASR, RA, seconds)
    ("nft", 0): (0.96, 0.02, 0.90, 10.0), ("nft", 1): (0.94, 0.06, 0.86, 12.0),
    ("ft", 0): (0.97, 0.80, 0.15, 100.0), ("ft", 1): (0.95, 0.60, 0.35, 140.0),
}


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for (defense, seed), (acc, asr, ra, secs) in CELLS.items():
        write(root / "grid-a" / "records", make_record(defense, seed, acc, asr, ra, secs))
    write(root / "grid-a" / "records", make_record("nft", 2, 0, 0, 0, 0, status="error"))
    # NFT on another budget, and a benign victim (status ok, no ASR/DER) in a second grid folder
    write(root / "grid-b" / "records", make_record("nft", 0, 0.93, 0.10, 0.80, 9.0, budget="1/class",
                                                   clean_samples=10))
    write(root / "grid-b" / "records", make_record("nft", 0, 0.97, None, None, 8.0, attack=None))
    (root / "grid-b" / "records" / "junk.json").write_text("{not json")
    return root


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_leaderboard_csv_markdown_and_plots(results, tmp_path):
    out = tmp_path / "board"
    written = build_leaderboard([results], out)
    rows = read_rows(out / "image" / "digits.csv")
    cell = {(r["attack"], r["defense"], r["budget"]): r for r in rows}
    assert len(rows) == 4, rows

    for defense in ("nft", "ft"):
        r = cell[("badnets", defense, "0.01")]
        for i, col in enumerate(("clean_acc", "asr", "ra", "defense_time_s")):
            values = [CELLS[(defense, s)][i] for s in (0, 1)]
            assert float(r[f"{col}_mean"]) == pytest.approx(statistics.mean(values), rel=1e-5)
            assert float(r[f"{col}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-5)
        assert r["n_seeds"] == "2" and r["clean_samples"] == "13"
        assert float(r["asr_before"]) == pytest.approx(1.0) and float(r["clean_acc_before"]) == pytest.approx(0.99)
    assert cell[("badnets", "nft", "0.01")]["failed"] == "1"
    assert "NonFiniteLossError" in cell[("badnets", "nft", "0.01")]["errors"]
    assert cell[("badnets", "ft", "0.01")]["failed"] == "0"
    ratio = float(cell[("badnets", "ft", "0.01")]["time_vs_nft_mean"])
    assert ratio == pytest.approx((100 / 10 + 140 / 12) / 2, rel=1e-4)  # the mean of per-seed ratios
    assert float(cell[("badnets", "nft", "0.01")]["time_vs_nft_mean"]) == pytest.approx(1.0)
    one = cell[("badnets", "nft", "1/class")]
    assert one["n_seeds"] == "1" and one["clean_acc_std"] == "" and float(one["asr_mean"]) == pytest.approx(0.1)
    benign = cell[("none", "nft", "0.01")]  # ok without ASR/DER: kept, blanks where there is nothing to average
    assert benign["asr_mean"] == "" and benign["der_mean"] == "" and float(benign["clean_acc_mean"]) == 0.97

    md = (out / "LEADERBOARD.md").read_text()
    assert md.splitlines()[2].startswith("Regenerate with: `nftbench leaderboard")
    assert "## image / digits" in md
    assert "**1 of 3 FAILED**" in md  # the failed seed of NFT is in its row ...
    assert "NonFiniteLossError" in md and "seed 2" in md  # ... and listed under the table
    assert "95.00 ± 1.41" in md  # NFT's C-ACC in %, mean ± std
    assert "junk.json" in md and any("junk.json" in n for n in written["notes"])

    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["image_digits_asr_vs_acc.png", "image_digits_nft_budget.png", "image_digits_runtime.png"]
    for p in (out / "plots").glob("*.png"):
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_cell_whose_every_run_failed(tmp_path):
    records = tmp_path / "records"  # a records folder given directly
    write(records, make_record("anp", 0, 0, 0, 0, 0, status="error"))
    write(records, make_record("nft", 0, 0.96, 0.02, 0.9, 10.0))
    # a sweep cell whose task could not be built: no victim metrics, no resolved model or attack options
    unresolved = make_record("clp", 0, 0, 0, 0, 0, status="error")
    unresolved["config"]["task"]["model"] = None
    unresolved["config"]["attack"] = {"name": "badnets"}
    del unresolved["before"]
    write(records, unresolved)
    # the same attack with another poison rate is another row, named by the option that differs
    other = make_record("nft", 0, 0.9, 0.5, 0.4, 10.0)
    other["config"]["attack"]["poison_rate"] = 0.05
    other["run_id"] += "-p05"
    write(records, other)
    out = tmp_path / "board"
    build_leaderboard([records], out)
    rows = {(r["attack"], r["defense"]): r for r in read_rows(out / "image" / "digits.csv")}
    anp = rows[("badnets[poison_rate=0.1]", "anp")]
    assert anp["n_seeds"] == "0" and anp["failed"] == "1" and anp["clean_acc_mean"] == ""
    assert rows[("badnets", "clp")]["failed"] == "1" and rows[("badnets", "clp")]["clean_acc_before"] == ""
    assert float(rows[("badnets[poison_rate=0.05]", "nft")]["asr_mean"]) == pytest.approx(0.5)
    assert float(rows[("badnets[poison_rate=0.1]", "nft")]["asr_mean"]) == pytest.approx(0.02)
    md = (out / "LEADERBOARD.md").read_text()
    anp_line = next(line for line in md.splitlines() if "| anp |" in line)
    assert "**FAILED**" in anp_line and "**1 of 1 FAILED**" in anp_line
    assert "| - | quick | badnets | 0.01 | clp |" in md


def test_leaderboard_cli(results, tmp_path, capsys):
    from benchmarks.cli import main

    out = tmp_path / "cli-board"
    main(["leaderboard", str(results), "--out", str(out), "--no-plots"])
    assert (out / "image" / "digits.csv").is_file() and (out / "LEADERBOARD.md").is_file()
    assert not (out / "plots").exists()
    assert "7 records (1 failed)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# Performance.


@pytest.fixture
def seeded_victim_cache(tmp_path) -> Path:
    """A victim cache holding an untrained digits BadNets victim, so perf loads it instead of training one
    (wall times do not depend on the weights). Its own folder: the session's trained victim is not touched."""
    from attacks import create_attack
    from common.checkpoint import save_checkpoint
    from tasks import create_task
    from training.victims import victim_config, victim_dir

    runs = tmp_path / "runs"
    task = create_task("image", dataset="digits", device="cpu", cache_dir=runs)
    attack = create_attack("badnets", seed=0)
    config = victim_config(task, attack, 0)
    d = victim_dir(runs, config)
    meta = {"victim_id": d.name, "config": config, "metrics": {"clean_acc": 0.1, "asr": 0.1, "ra": 0.1},
            "train_time_s": 1.0}
    save_checkpoint(d, task.build_model().eval(), meta, sidecar_name="victim.json")
    return runs


def test_perf_quick_on_digits(seeded_victim_cache, tmp_path, capsys):
    from benchmarks.cli import main
    from defenses import DEFENSES

    out = tmp_path / "perf.json"
    main(["perf", "--dataset", "digits", "--device", "cpu", "--quick", "--quick-factor", "0.002", "--train-steps",
          "2", "--warmup-steps", "1", "--runs-dir", str(seeded_victim_cache), "--json", str(out),
          "--set", "fine-pruning.prune_step=0.25"])
    text = capsys.readouterr().out
    assert "| defence | options | time (s) | x NFT |" in text
    assert "--quick: step counts x0.002 of the defaults" in text and "test data: not used" in text
    nft_line = next(line for line in text.splitlines() if line.startswith("| nft |"))
    assert nft_line.endswith("| 1.00 |") and "steps=2" in nft_line
    result = json.loads(out.read_text())
    timed = {r["defense"]: r for r in result["defenses"]}
    assert set(timed) == set(DEFENSES.names()) - {"none"}
    assert all("error" not in r and r["time_s"] > 0 for r in timed.values()), timed
    assert timed["anp"]["options"] == {"iterations": 4} and timed["i-bau"]["options"] == {"rounds": 1}
    assert timed["nft"]["ratio_to_nft"] == 1.0
    assert result["training"]["images_per_s"] > 0 and result["training"]["steps"] == 2


def test_perf_module_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0 and "--quick" in out.stdout and "--val-frac" in out.stdout


def test_perf_times_sweep_variants_side_by_side(seeded_victim_cache, tmp_path, capsys):
    from benchmarks.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\ntask: image\ndatasets: [digits]\nattacks: [badnets]\nseeds: [0]\n"
                    "budgets: [{val_frac: 0.05}]\n"
                    "defenses: [none, nft, {name: nft, mixup: false}, {name: nft, steps: 4000}]\n")
    out = tmp_path / "perf.json"
    main(["perf", "--dataset", "digits", "--device", "cpu", "--quick", "--quick-factor", "0.002", "--train-steps",
          "1", "--warmup-steps", "0", "--runs-dir", str(seeded_victim_cache), "--json", str(out),
          "--variants", str(grid)])
    rows = {r["defense"]: r for r in json.loads(out.read_text())["defenses"]}
    assert list(rows) == ["nft", "nft[mixup=False]", "nft[steps=4000]"]  # 'none' is not a defence to time
    assert rows["nft"]["options"] == {"steps": 2} and rows["nft"]["ratio_to_nft"] == 1.0
    assert rows["nft[mixup=False]"]["options"] == {"steps": 2, "mixup": False}
    assert rows["nft[steps=4000]"]["options"] == {"steps": 8}  # the variant's own steps, scaled alike
    assert all(r["time_s"] > 0 and r["name"] == "nft" for r in rows.values())
    assert "| nft[mixup=False] |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["perf", "--dataset", "digits", "--variants", str(grid), "--defenses", "nft"])
