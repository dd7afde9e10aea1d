"""Reliability (issue 25): writes never destroy, concurrent writers and sweeps lose and repeat nothing, dataset
caches are keyed by what they are made from, and every bad input is one line (exit 2, no traceback) before any
work. No test here trains a model: victims are untrained models written into a private victim cache."""

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from benchmarks.cli import main
from benchmarks.grid import load_sweep
from benchmarks.plan import plan_sweep
from benchmarks.records import CSV_COLUMNS, ResultsFileError, append_csv_row
from benchmarks.run import Paths
from benchmarks.sweep import run_sweep
from common.checkpoint import save_checkpoint
from common.fileio import file_lock
from tasks.data_cache import list_caches

ROOT = Path(__file__).resolve().parents[1]


def cheap_victim(task, attack, seed, runs_dir):
    """An untrained model saved as the cached victim of (task, attack, seed): a sweep loads it, never trains."""
    from training.victims import victim_config, victim_dir

    config = victim_config(task, attack, seed)
    d = victim_dir(runs_dir, config)
    torch.manual_seed(seed)
    model = task.build_model().eval()
    save_checkpoint(d, model, {"victim_id": d.name, "config": config, "metrics": task.evaluate(model, attack),
                               "train_time_s": 0.0}, sidecar_name="victim.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder with digits decoded and a cheap BadNets victim for seed 0."""
    from attacks import create_attack
    from tasks import create_task

    d = tmp_path_factory.mktemp("reliability-runs")
    cheap_victim(create_task("image", dataset="digits", device="cpu", cache_dir=d), create_attack("badnets"), 0, d)
    return d


def grid_file(folder: Path, **overrides) -> Path:
    grid = {"name": "t", "task": "image", "datasets": ["digits"], "attacks": ["badnets"],
            "defenses": ["none", {"name": "nft", "steps": 5}], "budgets": [{"per_class": 1}], "seeds": [0]}
    grid.update(overrides)
    p = folder / "grid.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in grid.items() if v is not None}, sort_keys=False))
    return p


def row(run_id: str) -> dict:
    return {"run_id": run_id, "status": "ok", "task": "image", "dataset": "digits"}


# ------------------------------------------------------------------------------------------- writes never destroy
def test_a_csv_that_is_not_nftbench_results_is_refused_and_left_untouched(tmp_path):
    theirs = tmp_path / "my.csv"
    theirs.write_text("name,score\nalice,1\n")
    with pytest.raises(ResultsFileError, match="my.csv is not an nftbench results CSV"):
        append_csv_row(theirs, row("a"))
    assert theirs.read_text() == "name,score\nalice,1\n"
    ours = tmp_path / "results.csv"
    append_csv_row(ours, row("a"))
    append_csv_row(ours, row("b"))
    append_csv_row(ours, {**row("a"), "status": "error"})  # replaced by run id
    rows = list(csv.DictReader(ours.open()))
    assert [(r["run_id"], r["status"]) for r in rows] == [("b", "ok"), ("a", "error")]
    assert not list(tmp_path.glob(".*.tmp*"))


def _append_rows(path: str, writer: int) -> None:
    for i in range(20):
        append_csv_row(path, row(f"w{writer}-{i}"))


def test_eight_processes_appending_at_once_keep_every_row(tmp_path):
    path = tmp_path / "results.csv"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(str(path), w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 160 and len({r["run_id"] for r in rows}) == 160
    assert list(rows[0]) == CSV_COLUMNS


# ------------------------------------------------------------------------------------------- cell claims
def test_a_claimed_cell_is_left_to_its_claimant_and_taken_from_its_record(tmp_path, runs):
    grid = load_sweep(grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 5}]))
    out = tmp_path / "out"
    paths = Paths(runs_dir=runs, device="cpu")
    held, other = (c.run_id for c in plan_sweep(grid, out, paths, log=lambda s: None).cells)
    done = threading.Event()
    with file_lock(out / "claims" / f"{held}.lock"):  # "another sweep" is running this cell
        worker = threading.Thread(target=lambda: (run_sweep(grid, out, paths, log=lambda s: None), done.set()))
        worker.start()
        deadline = time.monotonic() + 60
        while not (out / "records" / f"{other}.json").is_file():  # the free cell runs first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert not done.is_set() and not (out / "logs" / f"{held}.log").exists()  # waiting, not running it
        theirs = {**json.loads((out / "records" / f"{other}.json").read_text()), "run_id": held, "mark": "theirs"}
        (out / "records" / f"{held}.json").write_text(json.dumps(theirs))  # the claimant finishes it
    worker.join(60)
    assert done.is_set() and not (out / "logs" / f"{held}.log").exists()  # taken as it is, never rerun here
    assert json.loads((out / "records" / f"{held}.json").read_text())["mark"] == "theirs"


def test_a_claim_dies_with_its_process(tmp_path, runs):
    grid = grid_file(tmp_path, defenses=["none"])
    out = tmp_path / "out"
    (cell,) = plan_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None).cells
    lock = out / "claims" / f"{cell.run_id}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); "
                               "time.sleep(600)", str(lock)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"1"  # it holds the claim
    with file_lock(lock, blocking=False) as got:
        assert not got
    holder.kill()
    holder.wait()
    res = run_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None)
    assert res.failed == 0 and (out / "logs" / f"{cell.run_id}.log").read_text().count("=== ") == 1


def test_two_sweep_processes_on_one_grid_run_each_cell_once(tmp_path, runs):
    grid = grid_file(tmp_path, defenses=["none", *({"name": "nft", "steps": s} for s in (20, 21, 22, 23, 24))])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.cli", "sweep", str(grid), "--out", str(out), "--runs-dir", str(runs),
           "--device", "cpu"]
    env = {**os.environ, "NFTBENCH_QUIET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    logs = sorted((out / "logs").glob("*.log"))
    assert len(logs) == 6 and all(log.read_text().count("=== ") == 1 for log in logs)  # each cell ran once
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 6


def test_failed_cells_say_whether_to_fix_or_to_retry(tmp_path, runs, monkeypatch, capsys):
    import benchmarks.run as run_mod

    errors = iter([ValueError("poison_rate 0.9 asks for too many samples"), OSError("No space left on device")])

    def failing(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(run_mod, "get_victim", failing)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid_file(tmp_path)), "--out", str(out), "--runs-dir", str(runs), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "2 cell(s) failed" in err and "1 need the config or data fixed first" in err
    assert "1 failed for a passing reason (memory, a lost worker): rerun the same command to retry them" in err
    table = (out / "table.md").read_text()
    assert "[fix] digits badnets none" in table and "[retry] digits badnets nft" in table


# ------------------------------------------------------------------------------------------- dataset caches
def fake_cifar(root: Path, value: int) -> Path:
    """A CIFAR-10 ImageFolder copy with two 32x32 images per class and split, all pixels ``value``."""
    from PIL import Image

    from tasks.image_data import CIFAR10_CLASSES

    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), value + i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_two_data_roots_give_two_caches_and_a_changed_file_invalidates(tmp_path, capsys):
    from PIL import Image

    from tasks.image_data import load_image_dataset

    runs = tmp_path / "runs"
    a, b = fake_cifar(tmp_path / "a", 10), fake_cifar(tmp_path / "b", 200)
    da, db = load_image_dataset("cifar10", a, runs), load_image_dataset("cifar10", b, runs)
    assert int(da.train.x[0, 0, 0, 0]) == 10 and int(db.train.x[0, 0, 0, 0]) == 200
    assert da.fingerprint != db.fingerprint and len(list_caches(runs)) == 2
    assert load_image_dataset("cifar10", a, runs).fingerprint == da.fingerprint and not capsys.readouterr().err

    Image.fromarray(np.full((32, 32, 3), 99, np.uint8)).save(a / "train" / "airplane" / "0.png")
    changed = load_image_dataset("cifar10", a, runs)
    assert int(changed.train.x[0, 0, 0, 0]) == 99 and changed.fingerprint != da.fingerprint
    assert "changed since it was decoded); decoding the dataset again" in capsys.readouterr().err

    (cache,) = [e.path for e in list_caches(runs) if Path(e.source).resolve() == a.resolve()]
    with open(cache / "train_x.npy", "r+b") as f:  # truncated, as a full disk or a killed copy leaves it
        f.truncate(200)
    assert int(load_image_dataset("cifar10", a, runs).train.x[0, 0, 0, 0]) == 99
    assert f"dataset cache {cache} is unreadable" in capsys.readouterr().err


def test_cache_ls_and_clean(tmp_path, capsys):
    from tasks.image_data import load_image_dataset

    runs = tmp_path / "runs"
    load_image_dataset("cifar10", fake_cifar(tmp_path / "a", 10), runs)
    (runs / "datasets" / "cifar10").mkdir()  # an older nftbench's cache, keyed by name only
    (runs / "datasets" / "cifar10" / "meta.json").write_text("{}")
    main(["cache", "ls", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert "  ok  " in out and "stale (decoded by an older nftbench" in out
    main(["cache", "clean", "--runs-dir", str(runs)])
    assert "1 cache(s) removed" in capsys.readouterr().out
    assert [e.state for e in list_caches(runs)] == ["ok"]
    main(["cache", "clean", "--all", "--runs-dir", str(runs)])
    assert not list_caches(runs) and (runs / "datasets").is_dir()


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files the bad-input table points at."""
    d = tmp_path_factory.mktemp("bad")
    (d / "a-file").write_text("x")
    (d / "fake.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"w": torch.zeros(1)}, d / "resnet50.pth")
    (d / "empty").mkdir()
    (d / "config-only").mkdir()
    (d / "config-only" / "config.json").write_text('{"model_type": "marian"}')
    (d / "fake-marian").mkdir()
    for name, text in (("config.json", '{"model_type": "marian"}'), ("tokenizer.json", "{}"),
                       ("model.safetensors", "not safetensors")):
        (d / "fake-marian" / name).write_text(text)
    (d / "bad-tokenizer").mkdir()
    (d / "bad-tokenizer" / "config.json").write_text('{"model_type": "marian"}')
    (d / "bad-tokenizer" / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(d / "bad-tokenizer" / "model.safetensors"))
    (d / "evil.yaml").write_text("train: !!python/object/apply:os.system ['touch PWNED']\nnames: [a]\nval: x\n")
    return d


PWN = "!!python/object/apply:os.system ['touch PWNED']"
RUN = ["run", "--device", "cpu", "--defense", "none"]
BAD_RUNS = [  # (arguments after `nftbench run ...`, what the one line says)
    (["--model-param", "width=-1"], "option 'width' must be > 0, got -1"),
    (["--model-param", "widht=0.5"], "has no option(s) ['widht']"),
    (["--model-param", "width=wide"], "option 'width' must be a number, got 'wide'"),
    (["--target", "99"], "target 99 is not a class of digits (classes 0..9)"),
    (["--set", "mixup=maybe", "--defense", "nft"], "option 'mixup' must be true or false, got 'maybe'"),
    (["--set", "steps=2.5", "--defense", "nft"], "option 'steps' must be a whole number, got 2.5"),
    (["--set", "mask_target=bn_gama", "--defense", "nft"], "nft mask_target must be one of bn_gamma"),
    (["--set", "steps=[1"], "--set 'steps=[1': '[1' is not a plain YAML value"),
    (["--set", f"steps={PWN}"], "is not a plain YAML value"),
    (["--attack-param", f"size={PWN}"], "--attack-param"),
    (["--model-param", f"width={PWN}"], "--model-param"),
    (["--task", "translation", "--per-class", "1"], "the translation task has no classes"),
    (["--attack", "pointba-i"], "attack 'pointba-i' is a pointcloud attack; the image task takes image attacks"),
    (["--val-frac", "2"], "clean fraction must be in (0, 1], got 2.0"),
    (["--results", "{bad}"], "is a folder; give a file path such as"),
    (["--results", "{bad}/a-file/results.csv"], "a-file is a file, so nothing can be created under it"),
    (["--results", "{bad}/a-file"], "is not an nftbench results CSV"),
    (["--runs-dir", "{bad}/a-file"], "--runs-dir {bad}/a-file is a file; give a folder"),
    (["--results", "{bad}/" + "r" * 300 + ".csv"], "longer than the file system's limit of 255"),
    (["--model", "resnet50", "--model-param", "pretrained={bad}/fake.safetensors"], "is not a safetensors file"),
    (["--model", "resnet50", "--model-param", "pretrained={bad}/resnet50.pth"],
     "nftbench loads only safetensors (unpickling a .pth can run code). Convert it once"),
    (["--model", "resnet50", "--model-param", "pretrained={bad}/none.safetensors"], "does not exist"),
    (["--task", "translation", "--model-param", "pretrained={bad}/nowhere"], "is not a folder"),
    (["--task", "translation", "--model-param", "pretrained={bad}/empty"], "lacks config.json, tokenizer.json"),
    (["--task", "translation", "--model-param", "pretrained={bad}/config-only"], "lacks tokenizer.json"),
    (["--task", "translation", "--model-param", "pretrained={bad}/fake-marian"], "is not a safetensors file"),
    (["--task", "translation", "--model-param", "pretrained={bad}/bad-tokenizer"],
     "tokenizer.json is not a `tokenizers` tokenizer file"),
    (["--task", "detection", "--dataset", "{bad}/evil.yaml", "--attack", "none"],
     "evil.yaml is not a plain YAML dataset file"),
    (["--task", "video", "--model-param", "width=-1"], "model cnn3d-small (video, procedural): option 'width' must"),
    (["--task", "video", "--model-param", "foo=1"], "has no option(s) ['foo']; valid: ['width']"),
    (["--task", "video", "--scale", "paper", "--model-param", "pretrained={bad}/resnet50.pth"],
     "nftbench loads only safetensors"),
]


@pytest.mark.parametrize("args, expected", BAD_RUNS, ids=[" ".join(a)[:60] for a, _ in BAD_RUNS])
def test_bad_run_inputs_are_one_line_before_any_work(args, expected, bad, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{bad}", str(bad)) for a in [*RUN, "--runs-dir", str(runs), *args]]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("nftbench: error: ") and "Traceback" not in err
    assert expected.replace("{bad}", str(bad)) in err
    assert len(list((runs / "victims").iterdir())) == 1  # only the fixture's victim: nothing was trained
    assert not (tmp_path / "PWNED").exists() and not (runs / "records").exists()


BAD_GRIDS = [  # (grid overrides, what the error says); each fails `sweep --dry-run`
    ({"attacks": [{"name": "badnets", "target": 99}]}, "target 99 is not a class of digits"),
    ({"models": [{"name": "resnet-tiny", "width": -1}]}, "option 'width' must be > 0"),
    ({"task": "translation", "datasets": ["procedural"], "attacks": ["nmt-trigger"], "defenses": ["none"]},
     "the translation task has no classes"),
    ({"defenses": [{"name": "nft", "mixup": "maybe"}]}, "option 'mixup' must be true or false"),
    ({"defenses": [{"name": "nft", "mask_target": "bn_gama"}]}, "nft mask_target must be one of"),
    ({"name": "../../escaped"}, "name: '../../escaped' is not a folder name"),
    ({"name": "/tmp/elsewhere"}, "is not a folder name"),
    ({"attacks": ["pointba-i"]}, "attack 'pointba-i' is a pointcloud attack"),
    ({"task": "video", "datasets": ["procedural"], "attacks": ["badnets-video"], "defenses": ["none"],
      "models": [{"name": "cnn3d-small", "width": 0}]}, "option 'width' must be > 0"),
]


@pytest.mark.parametrize("overrides, expected", BAD_GRIDS, ids=[e[:40] for _, e in BAD_GRIDS])
def test_bad_grids_fail_the_dry_run(overrides, expected, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid_file(tmp_path, **overrides)), "--runs-dir", str(runs), "--device", "cpu",
              "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and "nothing was run" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "escaped").exists()


def test_a_long_sweep_out_is_one_line(tmp_path, runs, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid_file(tmp_path)), "--runs-dir", str(runs), "--out", str(tmp_path / ("o" * 300))])
    assert e.value.code == 2 and "longer than the file system's limit" in capsys.readouterr().err


def test_ctrl_c_during_a_sweep_says_where_to_resume_and_keeps_records(tmp_path, runs):
    grid = grid_file(tmp_path, defenses=["none", {"name": "nft", "steps": 2000}, {"name": "nft", "steps": 3}])
    out = tmp_path / "out"
    first, second, _ = (c.run_id for c in
                        plan_sweep(load_sweep(grid), out, Paths(runs_dir=runs, device="cpu"), log=lambda s: None).cells)
    cmd = [sys.executable, "-m", "benchmarks.cli", "sweep", str(grid), "--out", str(out), "--runs-dir", str(runs),
           "--device", "cpu"]
    env = {**os.environ, "NFTBENCH_QUIET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,  # a background job
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # ignores SIGINT
    deadline = time.monotonic() + 120
    while not (out / "logs" / f"{second}.log").is_file():  # the long second cell has started
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"nftbench: interrupted; finished cells are kept in {out / 'records'}; "
                                            "run the same command again to resume (cells that were running rerun)")
    assert sorted(p.stem for p in (out / "records").glob("*.json")) == [first]
    assert json.loads((out / "records" / f"{first}.json").read_text())["status"] == "ok"
