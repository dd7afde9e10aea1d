"""Sweeps: validation up front, plan and dry run, skip/resume (also after SIGKILL), failed cells as rows,
bit-identical reruns, the victim lock, and the local (processes) and Ray executors.

Victims here are untrained models written straight into a private victim cache (the sweep machinery does not
care how good a victim is), so no test trains one and the file stays fast.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from benchmarks.cli import main
from benchmarks.grid import SweepConfigError, load_sweep
from benchmarks.plan import parse_only, plan_sweep, unresolved_run_id
from benchmarks.run import Paths
from benchmarks.sweep import run_sweep
from benchmarks.sweep_outputs import rebuild_csv
from common.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"started", "finished", "wall_time_s", "versions", "device"}


def cheap_victim(task, attack, seed, runs_dir):
    """An untrained model saved as the cached victim of (task, attack, seed): a sweep loads it, never trains."""
    from training.victims import victim_config, victim_dir

    config = victim_config(task, attack, seed)
    d = victim_dir(runs_dir, config)
    torch.manual_seed(seed)
    model = task.build_model().eval()
    meta = {"victim_id": d.name, "config": config, "metrics": task.evaluate(model, attack), "train_time_s": 0.0}
    save_checkpoint(d, model, meta, sidecar_name="victim.json")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A victim cache holding a (cheap) digits BadNets victim for seed 0."""
    from attacks import create_attack
    from tasks import create_task

    d = tmp_path_factory.mktemp("sweep-runs")
    task = create_task("image", dataset="digits", device="cpu", cache_dir=d)
    cheap_victim(task, create_attack("badnets", seed=0), 0, d)
    return d


def grid_file(folder: Path, **overrides) -> Path:
    grid = {"name": "t", "task": "image", "scale": "quick", "datasets": ["digits"], "attacks": ["badnets"],
            "defenses": ["none", {"name": "nft", "steps": 30}], "budgets": [{"per_class": 1}], "seeds": [0]}
    grid.update(overrides)
    grid = {k: v for k, v in grid.items() if v is not None}
    p = folder / "grid.yaml"
    p.write_text(yaml.safe_dump(grid, sort_keys=False))
    return p


def records_of(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))}


def stable(record: dict) -> dict:
    """A record without timestamps and wall times."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    if "defense_info" in out:
        out["defense_info"] = {k: v for k, v in out["defense_info"].items() if k not in VOLATILE}
    return out


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, expected", [
    ({"defences": ["nft"]}, "unknown key 'defences': did you mean 'defenses'?"),
    ({"defenses": [{"name": "nft", "stepz": 3}]}, "defence 'nft' has no option(s) ['stepz']; valid: ["),
    ({"defense_params": {"nft": {"steps": -1}}, "defenses": ["nft"]}, "nft steps and batch_size must be >= 1"),
    ({"attack_params": {"badnets": {"poison_rate": 2}}}, "poison_rate must be in [0, 1], got 2"),
    ({"attacks": ["badnetz"]}, "Did you mean 'badnets'"),
    ({"defenses": ["nfts"]}, "Valid defences"),
    ({"budgets": [{"val_frac": 2}]}, "clean fraction must be in (0, 1]"),
    ({"budgets": [{"frac": 0.1}]}, "expected {val_frac: fraction} or {per_class: k}"),
    ({"seeds": [-1]}, "seeds: expected integers >= 0"),
    ({"scale": "huge"}, "scale: must be one of ['fast', 'paper', 'quick']"),
    ({"models": ["resnet-tiniest"]}, "unknown image model 'resnet-tiniest'"),
    ({"datasets": "digits"}, "datasets: expected a non-empty list"),
])
def test_bad_sweep_config_is_one_clear_error_before_any_work(tmp_path, capsys, overrides, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid_file(tmp_path, **overrides)), "--out", str(out), "--runs-dir", str(tmp_path / "r"),
              "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "nothing was run" in err
    assert err.count("nftbench: error:") == 1
    assert not out.exists() and not (tmp_path / "r").exists()  # validated before any work


def test_every_problem_of_a_file_is_listed_at_once(tmp_path):
    path = grid_file(tmp_path, defenses=[{"name": "nft", "steps": -1}, {"name": "ft", "nope": 1}],
                     attack_params={"badnets": {"poison_rate": 2}}, extra=1)
    with pytest.raises(SweepConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "4 problem(s)" in msg and "steps" in msg and "nope" in msg and "poison_rate" in msg and "'extra'" in msg
    with pytest.raises(FileNotFoundError, match="presets: .*paper.*quick"):
        load_sweep("no-such-preset")


def test_presets_are_valid_and_paper_grid_is_the_papers():
    from benchmarks.grid import expand

    quick = load_sweep("quick")
    assert len(expand(quick)) == 8
    paper = load_sweep("paper")
    cfgs = expand(paper)
    assert {c.defense for c in cfgs} == {"none", "nft", "ft", "fine-pruning", "anp", "i-bau", "clp", "ft-sam", "fst",
                                         "nad", "rnp", "awm", "sau"}
    attacks = {(c.attack, c.attack_params.get("mode", "all-to-one")) for c in cfgs}
    assert len(attacks) == 14 and {("trojan", "all-to-all"), ("input-aware", "all-to-all"), ("fba", "all-to-one")
                                   } <= attacks  # the NFT paper's fourteen CIFAR-10 attacks
    assert {c.seed for c in cfgs} == {0, 1, 2}
    assert {c.model for c in cfgs} == {"preact-resnet18"} and {c.dataset for c in cfgs} == {
        "cifar10", "gtsrb", "tiny-imagenet"}
    assert {(c.val_frac, c.per_class) for c in cfgs} == {(0.01, None), (None, 1)}
    assert paper["data_root"] == "${DATA_ROOT}"


def test_model_entries_carry_options_and_the_leaderboard_keeps_them_apart():
    from benchmarks.grid import expand
    from benchmarks.leaderboard import records_frame

    grid = {"task": "image", "datasets": ["digits"], "attacks": ["badnets"], "defenses": ["nft"],
            "budgets": [{"val_frac": 0.05}], "seeds": [0],
            "models": [{"name": "preact-resnet18", "width": 0.25}, {"name": "preact-resnet18", "width": 0.5}, None],
            "model_params": {"preact-resnet18": {"width": 1.0}}}
    cfgs = expand(grid)
    assert [(c.model, c.model_kwargs) for c in cfgs] == [
        ("preact-resnet18", {"width": 0.25}), ("preact-resnet18", {"width": 0.5}), (None, {})]
    records = [{"run_id": str(i), "status": "ok", "config": {
        "task": {"task": "image", "dataset": "digits", "model": "preact-resnet18", "model_kwargs": {"width": w}},
        "attack": {"name": "badnets"}, "defense": "nft", "defense_params": {}, "budget": "0.05", "seed": 0}}
        for i, w in enumerate((0.25, 0.5))]
    df, notes = records_frame(records)
    assert not notes and list(df["model"]) == ["preact-resnet18[width=0.25]", "preact-resnet18[width=0.5]"]


def test_nft_study_presets_expand_to_their_grids():
    from benchmarks.grid import expand

    ablations = expand(load_sweep("nft-ablations"))
    assert len(ablations) == 3 * 3 * 14 and {c.defense for c in ablations} == {"none", "nft"}
    assert {"mix": "cutmix"} in [c.defense_params for c in ablations]
    assert len(expand(load_sweep("nft-budgets"))) == 3 * 4 * 3 * 3
    dev = expand(load_sweep("nft-dev-digits"))
    assert len(dev) == 3 * 3 * 14 and {c.dataset for c in dev} == {"digits"}
    assert {str(c.defense_params) for c in dev} == {str(c.defense_params) for c in ablations}  # same variants
    scale = expand(load_sweep("nft-scale"))
    assert {(c.model, c.model_kwargs.get("width")) for c in scale} == {
        ("resnet-quick", None), *(("preact-resnet18", w) for w in (0.125, 0.25, 0.5, 1.0))}


# ------------------------------------------------------------------------------------------- plan, dry run
def test_dry_run_prints_cells_with_hashes_and_an_estimate(tmp_path, runs, capsys):
    grid = grid_file(tmp_path, attacks=["badnets", "blend"])
    out = tmp_path / "out"
    main(["sweep", str(grid), "--dry-run", "--out", str(out), "--runs-dir", str(runs), "--device", "cpu"])
    text = capsys.readouterr().out
    plan = plan_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None)
    assert len(plan.cells) == 4 and len({c.run_id for c in plan.cells}) == 4
    for c in plan.cells:
        assert f"{c.run_id}  todo" in text
    assert "victims: 2 (1 to train, 1 cached)" in text and "defence runs: 2" in text
    assert "ESTIMATE" in text and "COST_TABLE" in text
    assert not out.exists()


# ------------------------------------------------------------------------------------------- runs and reruns
def test_sweep_writes_records_csv_logs_then_skips_done_cells_and_is_bit_identical(tmp_path, runs, capsys):
    grid = grid_file(tmp_path)
    paths = Paths(runs_dir=runs, device="cpu")
    out1, out2 = tmp_path / "a", tmp_path / "b"
    res = run_sweep(load_sweep(grid), out1, paths, log=lambda s: None)
    recs = records_of(out1)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs.values()), recs
    df = pd.read_csv(out1 / "results.csv")
    assert sorted(df.run_id) == sorted(recs) and list(df.status) == ["ok", "ok"] and res.failed == 0
    assert list(df.defense) == ["none", "nft[steps=30]"] and (out1 / "table.md").is_file()  # labelled by options
    assert "| nft[steps=30] |" in (out1 / "table.md").read_text()
    for run_id in recs:
        log = (out1 / "logs" / f"{run_id}.log").read_text()
        assert f"cell {run_id}" in log and "status: ok" in log

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out1 / "records").iterdir()}
    main(["bench", "--preset", str(grid), "--out", str(out1), "--runs-dir", str(runs), "--device", "cpu"])
    assert "2 done (skipped), 0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out1 / "records").iterdir()} == mtimes
    assert pd.read_csv(out1 / "results.csv").equals(df)

    # same seed, same CPU, fresh output folder: the same numbers to the bit
    run_sweep(load_sweep(grid), out2, paths, log=lambda s: None)
    again = records_of(out2)
    assert again.keys() == recs.keys()
    for run_id, r in recs.items():
        assert stable(again[run_id]) == stable(r)
    assert recs[next(k for k, r in recs.items() if r["config"]["defense"] == "nft")]["defense_info"]["loss_trace"]


def test_failed_cells_are_rows_with_their_error_and_the_sweep_goes_on(tmp_path, runs, monkeypatch, capsys):
    import benchmarks.run as run_mod

    real = run_mod.get_victim

    def flaky(task, attack, seed, runs_dir):
        if attack is not None and attack.name == "blend":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(task, attack, seed, runs_dir)

    monkeypatch.setattr(run_mod, "get_victim", flaky)
    grid = grid_file(tmp_path, datasets=["digits", "cifar10"], attacks=["badnets", "blend"], defenses=["none"],
                     data_root=str(tmp_path / "no-data"))
    out = tmp_path / "out"
    argv = ["sweep", str(grid), "--out", str(out), "--runs-dir", str(runs), "--device", "cpu"]
    for _ in range(2):  # a rerun retries the failed cells and keeps one row per cell
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1 and "3 cell(s) failed" in capsys.readouterr().err
        df = pd.read_csv(out / "results.csv")
        assert len(df) == 4 and df.run_id.is_unique
        assert sorted(df.status) == ["error", "error", "error", "ok"]
    by = {(r.dataset, r.attack): r for r in df.itertuples()}
    assert by["digits", "badnets"].status == "ok"
    assert "CUDA out of memory" in by["digits", "blend"].error
    assert "CIFAR-10 not found" in by["cifar10", "badnets"].error
    plan = plan_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None)
    unresolved = [c for c in plan.cells if c.status == "unresolved"]
    assert {c.run_id for c in unresolved} == {unresolved_run_id(c.cfg) for c in unresolved}
    assert {c.run_id for c in unresolved} <= set(df.run_id)
    assert "Failed cells" in (out / "table.md").read_text()
    rec = json.loads((out / "records" / f"{by['digits', 'blend'].run_id}.json").read_text())
    assert rec["status"] == "error" and "RuntimeError" in rec["traceback"]


def test_optional_datasets_are_skipped_when_absent(tmp_path, runs):
    grid = grid_file(tmp_path, optional_datasets=["cifar10"], defenses=["none"], data_root=str(tmp_path / "none"))
    notes = []
    plan = plan_sweep(load_sweep(grid), tmp_path / "out", Paths(runs_dir=runs, device="cpu"), log=notes.append)
    assert [c.cfg.dataset for c in plan.cells] == ["digits"] and "cifar10 not found" in plan.notes[0]


def test_sigkill_mid_cell_then_rerun_skips_finished_and_reruns_the_interrupted(tmp_path, runs):
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 150}, {"name": "nft", "steps": 5}])
    out = tmp_path / "out"
    plan = plan_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None)
    first, second, third = (c.run_id for c in plan.cells)
    cmd = [sys.executable, "-m", "benchmarks.cli", "sweep", str(grid), "--out", str(out), "--runs-dir", str(runs),
           "--device", "cpu"]
    env = {**os.environ, "NFTBENCH_QUIET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / "logs" / f"{second}.log").is_file():  # the second cell has started
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep did not reach its second cell"
            time.sleep(0.02)
        time.sleep(0.3)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert set(records_of(out)) == {first}, "only the first cell had finished"
    done = (out / "records" / f"{first}.json").stat().st_mtime_ns
    finished = records_of(out)[first]["finished"]

    main(cmd[3:])  # rerun to completion, in process
    recs = records_of(out)
    assert set(recs) == {first, second, third} and all(r["status"] == "ok" for r in recs.values())
    assert (out / "records" / f"{first}.json").stat().st_mtime_ns == done and recs[first]["finished"] == finished
    assert (out / "logs" / f"{first}.log").read_text().count("=== ") == 1  # not rerun
    assert (out / "logs" / f"{second}.log").read_text().count("=== ") == 2  # interrupted, then rerun
    df = pd.read_csv(out / "results.csv")
    assert list(df.run_id) == [first, second, third] and list(df.status) == ["ok"] * 3
    assert not list(out.rglob(".*.tmp*"))


def test_sweeps_sharing_a_folder_keep_each_others_rows(tmp_path, runs):
    paths = Paths(runs_dir=runs, device="cpu")
    out = tmp_path / "out"
    run_sweep(load_sweep(grid_file(tmp_path, name="first", defenses=["none"])), out, paths, log=lambda s: None)
    run_sweep(load_sweep(grid_file(tmp_path, name="second", defenses=[{"name": "nft", "steps": 5}])), out, paths,
              log=lambda s: None)
    df = pd.read_csv(out / "results.csv")
    assert list(df.defense) == ["nft[steps=5]", "none"]  # this grid's cells first, then the folder's other records
    table = (out / "table.md").read_text()
    assert table.startswith("# second") and "| none |" not in table


def test_reuse_copies_equal_runs_from_another_folder_and_runs_the_rest(tmp_path, runs, capsys):
    paths = Paths(runs_dir=runs, device="cpu")
    first = tmp_path / "first"
    run_sweep(load_sweep(grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}])), first, paths,
              log=lambda s: None)
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}, {"name": "nft", "steps": 6}])
    second = tmp_path / "second"
    main(["sweep", str(grid), "--out", str(second), "--runs-dir", str(runs), "--device", "cpu", "--dry-run",
          "--reuse", str(first)])
    assert "2 copied from --reuse folders, 1 to run" in capsys.readouterr().out
    run_sweep(load_sweep(grid), second, paths, log=lambda s: None, reuse=[first])
    copied, ran = records_of(first), records_of(second)
    assert set(copied) < set(ran) and len(ran) == 3
    for run_id, record in copied.items():  # copied verbatim, with where from
        assert ran[run_id] == {**record, "copied_from": str(first / "records" / f"{run_id}.json")}
    (new,) = set(ran) - set(copied)
    assert ran[new]["status"] == "ok" and "copied_from" not in ran[new]
    assert len(pd.read_csv(second / "results.csv")) == 3
    with pytest.raises(FileNotFoundError, match="no records/ folder there"):
        run_sweep(load_sweep(grid), second, paths, log=lambda s: None, reuse=[tmp_path / "nowhere"])


def test_only_runs_a_slice_and_the_slices_make_the_whole_grid(tmp_path, runs, capsys):
    paths = Paths(runs_dir=runs, device="cpu")
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}, {"name": "ft", "steps": 5}])
    out, whole = tmp_path / "sliced", tmp_path / "whole"
    main(["sweep", str(grid), "--out", str(out), "--runs-dir", str(runs), "--device", "cpu", "--dry-run",
          "--only", "defense=nft,none"])
    text = capsys.readouterr().out
    assert "2 to run" in text and "1 cell(s) not done yet are outside --only defense=nft,none" in text
    run_sweep(load_sweep(grid), out, paths, log=lambda s: None, only=["defense=nft,none"])
    assert {r["config"]["defense"] for r in records_of(out).values()} == {"none", "nft"}
    assert len(pd.read_csv(out / "results.csv")) == 2
    run_sweep(load_sweep(grid), out, paths, log=lambda s: None, only=["defense=ft", "seed=0"])
    run_sweep(load_sweep(grid), whole, paths, log=lambda s: None)
    assert {k: stable(r) for k, r in records_of(out).items()} == {k: stable(r) for k, r in records_of(whole).items()}
    assert len(pd.read_csv(out / "results.csv")) == 3  # the CSV is the whole grid's
    labelled = tmp_path / "labelled"
    run_sweep(load_sweep(grid), labelled, paths, log=lambda s: None, only=["defense=nft[steps=5]"])
    assert [r["config"]["defense"] for r in records_of(labelled).values()] == ["nft"]
    with pytest.raises(ValueError, match="attack=blned matches no cell of t; its attack values are badnets"):
        run_sweep(load_sweep(grid), out, paths, log=lambda s: None, only=["attack=blned"])
    with pytest.raises(ValueError, match="KEY one of task, dataset, model, attack, defense, seed, budget"):
        run_sweep(load_sweep(grid), out, paths, log=lambda s: None, only=["clean=0.01"])
    with pytest.raises(ValueError, match="budget=0.05 matches no cell of t; its budget values are 1/class"):
        run_sweep(load_sweep(grid), out, paths, log=lambda s: None, only=["budget=0.05"])
    by_budget = tmp_path / "by-budget"
    run_sweep(load_sweep(grid), by_budget, paths, log=lambda s: None, only=["budget=1/class", "defense=none"])
    assert [r["config"]["defense"] for r in records_of(by_budget).values()] == ["none"]


def test_only_values_split_on_commas_outside_a_labels_options():
    only = parse_only(["defense=nft, nad[batch_size=256,lr=0.01],i-bau[lr=0.0001]", "seed=1,2"])
    assert only == {"defense": {"nft", "nad[batch_size=256,lr=0.01]", "i-bau[lr=0.0001]"}, "seed": {"1", "2"}}


def test_csv_is_rebuilt_from_records_only(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "broken.json").write_text('{"run_id": "bro')  # never happens (atomic), still safe
    assert rebuild_csv(tmp_path, ["missing", "broken"]).read_text().count("\n") == 1  # header only


# ------------------------------------------------------------------------------------------- concurrency
def test_victim_lock_makes_concurrent_workers_train_once(tmp_path, monkeypatch):
    import training.victims as victims
    from attacks import create_attack
    from tasks import create_task

    calls = []

    def slow_train(task, split, recipe, seed, desc="train", max_steps=None, checkpoint=None):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        torch.manual_seed(seed)
        return task.build_model().eval()

    monkeypatch.setattr(victims, "train_model", slow_train)
    task = create_task("image", dataset="digits", device="cpu", cache_dir=tmp_path)
    attack = create_attack("badnets", seed=3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(victims.get_victim(task, attack, 3, tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert len({r[2] for r in results}) == 1 and len({r[1]["created"] for r in results}) == 1


def test_local_executor_with_two_worker_processes(tmp_path, runs):
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}])
    out = tmp_path / "out"
    res = run_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), workers=2, log=lambda s: None)
    assert res.failed == 0 and len(res.df) == 2
    assert all((out / "logs" / f"{c.run_id}.log").is_file() for c in res.plan.cells)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_on_a_local_instance(tmp_path, runs, ray_local):
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}], datasets=["digits", "cifar10"],
                     data_root=str(tmp_path / "no-data"))
    out = tmp_path / "out"
    res = run_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), executor="ray", log=lambda s: None)
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 and df.run_id.is_unique and res.failed == 2
    assert sorted(df.status) == ["error", "error", "ok", "ok"]
    assert set(df[df.status == "ok"].dataset) == {"digits"}
    assert all((out / "logs" / f"{c.run_id}.log").is_file() for c in res.plan.cells)


# ------------------------------------------------------------------------------------------- checkpoint configs
@pytest.mark.parametrize("damage, expected", [
    (lambda m: m["config"]["task"].update(colour=3), "unexpected keyword argument 'colour'"),
    (lambda m: m["config"]["attack"].update(poison_rate=2), "poison_rate must be in [0, 1], got 2"),
    (lambda m: m["config"]["attack"].update(sparkle=1), "has no option(s) ['sparkle']"),
    (lambda m: m["config"].pop("task"), "KeyError"),
    (None, "JSONDecodeError"),
])
def test_damaged_victim_config_is_one_clear_error(tmp_path, capsys, damage, expected):
    from attacks import create_attack
    from tasks import create_task

    task = create_task("image", dataset="digits", device="cpu", cache_dir=tmp_path)
    d = cheap_victim(task, create_attack("badnets", seed=0), 0, tmp_path)
    meta = json.loads((d / "victim.json").read_text())
    if damage is None:
        (d / "victim.json").write_text('{"config": {"task"')
    else:
        damage(meta)
        (d / "victim.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["purify", "--victim", str(d), "--runs-dir", str(tmp_path), "--device", "cpu", "--set", "steps=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a valid victim config" in err and expected in err
    assert "retrain the victim" in err and "Traceback" not in err


def test_yaml_exponents_reach_configs_as_numbers(tmp_path):
    """PyYAML reads ``1e-3`` as a string; options typed float or int are converted, nonsense is refused."""
    import yaml

    from attacks import create_attack
    from benchmarks.cli import parse_params
    from defenses import DEFENSES

    grid = yaml.safe_load("lr: 1e-2\nweight_decay: 5e-4\nepochs: '3'")
    cfg = DEFENSES.get("nad").make_config(grid)
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (0.01, 5e-4, 3)
    assert create_attack("blend", **parse_params(["alpha=2e-1"])).alpha == 0.2
    with pytest.raises(ValueError, match="option 'lr' must be a number"):
        DEFENSES.get("nad").make_config({"lr": "fast"})


def test_variant_selection_ranks_by_development_der_and_needs_a_paired_gain():
    """benchmarks/select.py: the best mean DER wins; it beats the default only by > 2 SE of the paired gain."""
    from benchmarks.select import rank_variants

    rows = []
    for seed, (base, steady, noisy) in enumerate([(0.60, 0.70, 0.95), (0.62, 0.71, 0.30), (0.58, 0.69, 0.80)]):
        for label, der in (("nft", base), ("nft[eta=0.0]", steady), ("nft[steps=250]", noisy)):
            rows.append({"task": "image", "dataset": "digits", "model": "resnet-tiny", "attack": "badnets",
                         "budget": "0.05", "seed": seed, "status": "ok", "defense_name": "nft", "defense": label,
                         "clean_acc_before": 0.99, "clean_acc_after": 0.95, "asr_after": 0.1, "der": der,
                         "defense_time_s": 10.0})
    rows.append({**rows[0], "defense_name": "ft", "defense": "ft", "der": 1.0})  # another defence: not ranked
    ranked = rank_variants(pd.DataFrame(rows))
    assert list(ranked.variant) == ["nft[eta=0.0]", "nft[steps=250]", "nft"]
    verdict = dict(zip(ranked.variant, ranked.beats_default, strict=True))
    assert verdict == {"nft[eta=0.0]": True, "nft[steps=250]": False, "nft": False}
    assert ranked.loc[ranked.variant == "nft[eta=0.0]", "gain_vs_default"].item() == pytest.approx(10.0)


def test_workers_start_on_different_victims_and_keep_each_victims_order():
    """Issue 21: N workers (on one GPU, or one per CPU core) take N victims, not N cells of the first victim that
    would wait on its training lock; a victim gets a second worker only when every victim left is busy."""
    from benchmarks.executors import VictimQueue
    from benchmarks.plan import Cell
    from benchmarks.run import RunConfig

    cells = [Cell(RunConfig(), f"{v}{i}", {}, victim_id=v) for v, n in (("A", 3), ("B", 2), ("C", 1)) for i in range(n)]
    queue = VictimQueue(cells)
    first = [queue.pop() for _ in range(3)]
    assert [c.run_id for c in first] == ["A0", "B0", "C0"]
    assert queue.pop().run_id == "A1"  # every victim busy: the earliest waiting cell, sharing A's trained copy
    queue.done(first[1])  # B0 finished: B is free again, so its next cell goes before A's third
    assert queue.pop().run_id == "B1"
    assert queue.pop().run_id == "A2" and not queue
