"""The corrected aggregate (x NFT per options family, medians), the static site, and the site in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from benchmarks.leaderboard import aggregate, load_frame

CIFAR_TIMES = {"nft": (10.0, 12.0, 10.0), "ft": (100.0, 140.0, 300.0), "anp": (50.0, 60.0, 70.0), "none": (0, 0, 0)}
ASR_AFTER = {"none": 1.0, "nft": 0.05, "ft": 0.6, "anp": 0.2}
DETECTION = {  # defence label -> (registered name, options, seconds)
    "none": ("none", {}, 0.0), "nft[batch_size=32,steps=300]": ("nft", {"batch_size": 32, "steps": 300}, 25.0),
    "nft[batch_size=32,mixup=False,steps=300]": ("nft", {"batch_size": 32, "mixup": False, "steps": 300}, 20.0),
    "ft[batch_size=32,steps=300]": ("ft", {"batch_size": 32, "steps": 300}, 20.0),
    "anp[batch_size=32,iterations=200]": ("anp", {"batch_size": 32, "iterations": 200}, 40.0),
    "clp": ("clp", {}, 0.05),
}


def record(task: str, dataset: str, model: str, attack: str, defense: str, params: dict, seed: int, asr: float,
           secs: float, status: str = "ok") -> dict:
    config = {"task": {"task": task, "dataset": dataset, "model": model, "scale": "quick", "model_kwargs": {}},
              "attack": {"name": attack, "target": 0, "mode": "all-to-one", "poison_rate": 0.1, "seed": seed},
              "defense": defense, "defense_params": params, "budget": "0.01" if task == "image" else "0.05",
              "seed": seed}
    run_id = re.sub(r"\W", "-", f"{dataset}-{attack}-{defense}-{json.dumps(params, sort_keys=True)}-{seed}")
    r = {"run_id": run_id, "status": status, "config": config, "victim_id": f"{attack}{seed}",
         "before": {"clean_acc": 0.9, "asr": 1.0, "ra": 0.0}, "device": "cpu (test)", "finished": "2026-01-01",
         "versions": {"nftbench": "0.1.0", "torch": "2.x"}}
    if status != "ok":
        return {**r, "error": "NonFiniteLossError: loss is nan at step 3"}
    acc = 0.9 - (0.1 if defense == "anp" else 0.02 * (defense != "none"))
    return {**r, "clean_samples": 500, "after": {"clean_acc": acc, "asr": asr, "ra": 0.5},
            "der": (max(0.0, 1.0 - asr) - max(0.0, 0.9 - acc) + 1) / 2,
            "defense_info": {"wall_time_s": secs, "config": {"steps": 1000, **params}}}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """CIFAR-10: two attacks x four defences x three seeds (ANP's seed 2 on Blend failed); detection: two attacks,
    every defence run with the quick grid's options, and an NFT variant."""
    root = tmp_path_factory.mktemp("results")
    folder = root / "grid" / "records"
    folder.mkdir(parents=True)
    runs = []
    for attack in ("badnets", "blend"):
        for defense, times in CIFAR_TIMES.items():
            for seed, secs in enumerate(times):
                failed = (attack, defense, seed) == ("blend", "anp", 2)
                runs.append(record("image", "cifar10", "resnet-quick", attack, defense, {}, seed,
                                   ASR_AFTER[defense] + 0.01 * seed, secs, status="error" if failed else "ok"))
        for name, params, secs in DETECTION.values():
            asr = 0.9 if name == "none" else 0.3
            runs.append(record("detection", "procedural", "yolov8-tiny", {"badnets": "gma", "blend": "oga"}[attack],
                               name, params, 0, asr, secs))
    for r in runs:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r))
    return root


def test_x_nft_compares_with_the_same_options_family_and_takes_medians(results):
    df, notes = load_frame([results])
    assert not notes and len(df) == 36
    det = df[df["task"] == "detection"].set_index("defense")
    family = "nft[batch_size=32,steps=300]"
    for label, (_, _, secs) in DETECTION.items():
        if label == "none":
            assert det.loc[label, "nft_reference"].isna().all()
            continue
        # every defence, the NFT variant included, against NFT with the grid's options; that NFT against itself
        assert set(det.loc[label, "nft_reference"]) == {family}, label
        assert det.loc[label, "time_vs_nft"].tolist() == pytest.approx([secs / 25.0] * 2)
    cells = aggregate(df[df["task"] == "image"]).set_index(["attack", "defense"])
    ft = cells.loc[("badnets", "ft")]
    assert ft["time_vs_nft_median"] == pytest.approx(140 / 12)  # median of 10, 11.7, 30; the mean is 17.2
    assert ft["time_vs_nft_mean"] == pytest.approx((10 + 140 / 12 + 30) / 3)
    assert ft["nft_reference"] == "nft"
    anp = cells.loc[("blend", "anp")]
    assert anp["failed"] == 1 and anp["n_seeds"] == 2 and "NonFiniteLossError" in anp["errors"]


def test_nft_reference_prefers_the_grids_options_then_defaults():
    from benchmarks.leaderboard import _reference

    nft = {"nft": {}, "nft[batch_size=32,steps=300]": {"batch_size": 32, "steps": 300}, "nft[mixup=False]":
           {"mixup": False}}
    family = {"batch_size", "steps"}
    quick = "nft[batch_size=32,steps=300]"
    assert _reference("ft[batch_size=32,steps=300]", False, {"batch_size": 32, "steps": 300}, nft, family) == quick
    assert _reference("anp[batch_size=32]", False, {"batch_size": 32, "iterations": 2}, nft, family) == quick
    assert _reference("clp", False, {}, nft, family) == "nft"
    assert _reference("nft", True, {}, nft, family) == "nft"  # the paper default against itself
    assert _reference("nft[mixup=False]", True, {"mixup": False}, nft, family) == "nft"
    assert _reference(quick, True, {"batch_size": 32, "steps": 300}, nft, family) == "nft"
    assert _reference("ft[steps=9]", False, {"steps": 9}, {quick: nft[quick]}, family) == quick  # the only NFT


def test_reproduce_command_gives_the_records_run_id(digits_task):
    from attacks import create_attack
    from benchmarks.cli import attack_params, build_parser, parse_params
    from benchmarks.run import run_config
    from benchmarks.site import reproduce_command
    from common.hashing import config_hash
    from tasks import CleanBudget

    attack = create_attack("blend", seed=1, poison_rate=0.05, alpha=0.3)
    params = {"mixup": False, "lr": 0.01, "mask_target": "bn_affine"}
    config = run_config(digits_task, attack, "nft", params, CleanBudget(fraction=None, per_class=2), 1)
    command = reproduce_command(json.loads(json.dumps(config)))
    assert "--attack-param alpha=0.3" in command and "--attack-param poison_rate=0.05" in command
    assert "--attack-param target" not in command  # the defaults are left out
    args = build_parser().parse_args(shlex.split(command)[1:])
    again = run_config(digits_task, create_attack(args.attack, seed=args.seed, **attack_params(args)), args.defense,
                       parse_params(args.set), CleanBudget(fraction=None, per_class=args.per_class), args.seed)
    assert config_hash(again) == config_hash(config)


@pytest.fixture(scope="module")
def site(results, tmp_path_factory) -> Path:
    from benchmarks.cli import main

    out = tmp_path_factory.mktemp("site")
    main(["leaderboard", str(results), "--html", "--out", str(out)])
    return out


def test_site_pages_are_self_contained_and_name_each_metric(site, results):
    names = sorted(p.name for p in site.iterdir())
    assert names == ["detection_procedural.html", "image_cifar10.html", "index.html", "plots", "site.css", "site.js"]
    assert len(list((site / "plots").glob("*.png"))) == 6
    index = (site / "index.html").read_text()
    assert "--html --out" in index and "36 run records, 1 failed" in index and "mAP@0.5" in index
    cifar = (site / "image_cifar10.html").read_text()
    det = (site / "detection_procedural.html").read_text()
    for page in (index, cifar, det):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loaded from elsewhere
        assert '<link rel="stylesheet" href="site.css">' in page  # the shared assets, once each beside the pages
    assert "<th data-type=\"num\" title=\"click to sort\">mAP@0.5</th>" in det and "C-ACC before" in cifar
    assert "92.96 / 100.00" in cifar  # the paper's BadNets victim beside ours
    assert "95.56 / 1.81" in cifar  # and its NFT average over 14 attacks in the ranking
    assert "Failed runs (1)" in cifar and "NonFiniteLossError" in cifar
    links = re.findall(r'href="([^"]+\.json)"', cifar)
    assert len(links) == 24 and all((site / link).is_file() for link in links)  # every ok and failed run's record
    assert "nftbench run --task detection --dataset procedural --model yolov8-tiny" in det
    assert "--set batch_size=32 --set mixup=false --set steps=300" in det


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_site_in_headless_chromium(site, tmp_path):
    """Driven with Playwright against the system Chromium (no browser download): no console errors, sorting,
    filtering, a cell's detail, a screenshot."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found: apt-get install -y chromium (.ci/run does), or set CHROMIUM=/path/to/it")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((site / "index.html").as_uri())
        page.click("a:text-is('cifar10')")
        page.wait_for_load_state("load")
        assert page.url.endswith("image_cifar10.html")
        rows = page.locator("#cells tbody tr:visible")
        expect(page.locator("#count")).to_have_text("8 of 8 cells")  # waits for the script; then synchronous
        assert rows.count() == 8

        page.click("#cells thead th:text-is('ASR')")
        asr = [float(v) for v in rows.evaluate_all("rs => rs.map(r => r.cells[9].dataset.v)")]
        assert asr == sorted(asr) and asr[0] == pytest.approx(0.06)
        page.click("#cells thead th:text-is('ASR')")
        assert [float(v) for v in rows.evaluate_all("rs => rs.map(r => r.cells[9].dataset.v)")] == sorted(asr)[::-1]

        page.select_option("select[data-filter=attack]", "blend")
        expect(page.locator("#count")).to_have_text("4 of 8 cells")
        assert rows.count() == 4
        page.fill("#search", "anp")
        expect(rows).to_have_count(1)

        rows.first.click()
        dialog = page.locator("dialog#detail")
        expect(dialog).to_be_visible()
        text = dialog.inner_text()
        assert "blend / anp" in text and "NonFiniteLossError" in text and "nftbench run --task image" in text
        assert "error" in text and "2 seed(s) finished (0 1), 1 failed" in text
        page.screenshot(path=str(tmp_path / "cell-detail.png"))
        page.click("dialog#detail button.close")
        expect(dialog).to_be_hidden()
        browser.close()
    assert errors == []
    assert (tmp_path / "cell-detail.png").stat().st_size > 10_000


def test_every_defence_gets_its_own_colour_and_marker():
    from benchmarks.leaderboard_plots import defence_styles

    labels = ["none", "nft", *(f"nft[eta={i}]" for i in range(14)), "ft", "ft[steps=3]", "anp", "clp", "nad[lr=1]"]
    styles = defence_styles(labels)
    assert len(set(styles.values())) == len(labels)
    assert styles["nft"][0] == styles["nft[eta=0]"][0] == "#000000" and styles["ft"][0] == styles["ft[steps=3]"][0]
