"""The NFT study report (benchmarks/study.py) on synthetic records of its four sweeps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.study import build_study, parameter_count


def record(part: Path, attack: str, defense: str, params: dict, seed: int, acc: float, asr: float, secs: float,
           *, budget: str = "0.01", samples: int = 500, model: str = "resnet-quick", model_kwargs: dict | None = None,
           status: str = "ok") -> None:
    run_id = f"{attack}-{defense}-{json.dumps(params, sort_keys=True)}-{budget}-{model}{model_kwargs}-{seed}"
    run_id = "".join(c if c.isalnum() else "_" for c in run_id)
    r = {
        "run_id": run_id, "status": status,
        "config": {"task": {"task": "image", "dataset": "cifar10", "model": model, "scale": "quick",
                            "model_kwargs": model_kwargs or {}},
                   "attack": {"name": attack, "target": 0, "poison_rate": 0.1, "seed": seed},
                   "defense": defense, "defense_params": params, "budget": budget, "seed": seed},
        "victim_id": f"{attack}{seed}{model}{model_kwargs}", "before": {"clean_acc": 0.84, "asr": 0.95, "ra": 0.04},
        "device": "cpu", "finished": "2026-01-01T00:00:00+0000",
    }
    if status == "ok":
        r.update(clean_samples=samples, after={"clean_acc": acc, "asr": asr, "ra": 0.5},
                 defense_info={"defense": defense, "wall_time_s": secs, "mask_neurons": 448,
                               "mask_mean": 0.9 - 0.1 * seed, "mask_below_0.5": 10 * seed},
                 der=(max(0.0, 0.95 - asr) - max(0.0, 0.84 - acc) + 1) / 2)
    else:
        r["error"] = "NonFiniteLossError: loss is nan"
    (part / "records").mkdir(parents=True, exist_ok=True)
    (part / "records" / f"{run_id}.json").write_text(json.dumps(r))


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "ablations"
    for seed in range(3):
        for attack in ("badnets", "blend"):
            # development grid: eta=0 gains 10 DER points on every cell (beats the default); mixup off loses
            record(root / "dev-digits", attack, "nft", {}, seed, 0.80, 0.50 + 0.01 * seed, 10)
            record(root / "dev-digits", attack, "nft", {"eta": 0.0}, seed, 0.80, 0.30 + 0.01 * seed, 12)
            record(root / "dev-digits", attack, "nft", {"mixup": False}, seed, 0.80, 0.60 - 0.02 * seed, 9)
            record(root / "variants", attack, "none", {}, seed, 0.84, 0.95, 0)
            record(root / "variants", attack, "nft", {}, seed, 0.80 + 0.01 * seed, 0.50, 100)
            # seed 2's run shared the machine with other work: it moves the mean time, not the median
            record(root / "variants", attack, "nft", {"steps": 250}, seed, 0.82, 0.70, 25 if seed < 2 else 100)
            for budget, n in (("1/class", 10), ("0.01", 500)):
                record(root / "budgets", attack, "nft", {}, seed, 0.7, 0.6 if n == 10 else 0.4, 90,
                       budget=budget, samples=n)
                record(root / "budgets", attack, "ft", {}, seed, 0.6, 0.9, 120, budget=budget, samples=n)
            for width in (0.125, 0.25):
                record(root / "scale", attack, "nft", {}, seed, 0.8, 0.2 / width / 10, 100,
                       model="preact-resnet18", model_kwargs={"width": width})
    record(root / "variants", "badnets", "nft", {"steps": 250}, 3, 0, 0, 0, status="error")
    return root


def test_study_tables_plots_and_honest_choice(study):
    written = build_study(study)
    assert {"dev_ranking.csv", "variants.csv", "budgets.csv", "scale.csv", "study.md", "variants.png",
            "budgets.png", "scale.png"} <= set(written)
    for name in ("variants.png", "budgets.png", "scale.png"):
        assert written[name].stat().st_size > 5000

    ranking = rows(study / "dev_ranking.csv")
    assert ranking[0]["variant"] == "nft[eta=0.0]" and ranking[0]["beats_default"] == "True"
    assert {r["variant"]: r["beats_default"] for r in ranking}["nft[mixup=False]"] == "False"

    variants = {(r["attack"], r["defense"]): r for r in rows(study / "variants.csv")}
    default = variants[("badnets", "nft")]
    assert float(default["clean_acc_mean"]) == pytest.approx(0.81)
    assert float(default["clean_acc_std"]) == pytest.approx(0.01)
    assert default["n_seeds"] == "3" and default["seeds"] == "0 1 2"
    short = variants[("badnets", "nft[steps=250]")]
    assert float(short["time_vs_nft_mean"]) == pytest.approx(0.5)
    assert float(short["time_vs_nft_median"]) == pytest.approx(0.25)
    assert short["failed"] == "1"  # the failed seed is counted, not dropped
    assert float(default["masks_below_half"]) == pytest.approx(10) and float(default["mask_mean"]) == pytest.approx(0.8)

    budgets = {(r["attack"], r["defense"], r["clean_samples"]): r for r in rows(study / "budgets.csv")}
    assert float(budgets[("blend", "nft", "10")]["asr_mean"]) == pytest.approx(0.6)
    assert float(budgets[("blend", "ft", "500")]["asr_mean"]) == pytest.approx(0.9)

    scale = rows(study / "scale.csv")
    assert [r["model"] for r in scale[:2]] == ["preact-resnet18[width=0.125]", "preact-resnet18[width=0.25]"]
    assert int(scale[0]["params"]) < int(scale[1]["params"])
    assert scale[0]["mask_neurons"] == "448"

    md = (study / "study.md").read_text()
    assert "Chosen: `nft[eta=0.0]`; it beats the paper default" in md
    assert "| nft[steps=250] | 82.0 ± 0.0 / 70.0 ± 0.0 (3) | 82.0 ± 0.0 / 70.0 ± 0.0 (3) | 25 | 0.25 |" in md
    assert "| 1/class (10 images) |" in md


def test_side_by_side_ratios_sit_beside_the_sweeps(study):
    perf = {"device": "cpu (test)", "attack": "badnets", "seed": 0, "victim": {"victim_id": "v0"},
            "mode": "defaults", "defenses": [{"defense": "nft", "ratio_to_nft": 1.0},
                                             {"defense": "nft[steps=250]", "ratio_to_nft": 0.31}]}
    (study / "perf.json").write_text(json.dumps(perf))
    build_study(study)
    md = (study / "study.md").read_text()
    assert "| time (s, median) | x default (median) | x default (one run) |" in md
    assert "(3) | 25 | 0.25 | 0.31 |" in md and "| nft | " in md and "(3) | 100 | 1.00 | 1.00 |" in md
    assert "one run on one victim (`perf.json`): cpu (test), badnets victim v0, seed 0, defaults." in md
    assert float({r["defense"]: r for r in rows(study / "variants.csv") if r["attack"] == "badnets"}
                 ["nft[steps=250]"]["time_vs_nft_median"]) == pytest.approx(0.25)  # the CSV keeps the sweeps' own


def test_parameter_count_and_empty_study(tmp_path):
    assert parameter_count("preact-resnet18") == pytest.approx(11.17e6, rel=0.01)
    assert parameter_count("no-such-model") is None
    build_study(tmp_path)
    assert "no finished records" in (tmp_path / "study.md").read_text()
