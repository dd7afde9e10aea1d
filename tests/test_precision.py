"""The suite-wide precision setting: what autocast obeys, what ids and records carry, the CLI option, and a short
victim trained under bf16 (the rest of the suite runs fp32; see conftest)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from attacks import create_attack
from benchmarks.cli import build_parser, main
from benchmarks.run import run_config
from common.hashing import config_hash
from common.precision import PRECISION_ENV, autocast, cpu_has_bf16, get_precision, precision_in_effect, set_precision
from tasks import CleanBudget
from training.victims import get_victim, victim_config, victim_dir

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BF16_EPOCHS = 4  # a short victim: the bf16 path, not a good model


def matmul_dtype() -> torch.dtype:
    with autocast(CPU):
        return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype


def test_autocast_obeys_the_setting_and_the_environment(monkeypatch):
    assert get_precision() == "fp32" and matmul_dtype() == torch.float32  # the suite's own setting
    set_precision("bf16")
    assert get_precision() == "bf16" and precision_in_effect(CPU) == "bf16" and matmul_dtype() == torch.bfloat16
    assert precision_in_effect(CPU, enabled=False) == "fp32"  # a task built with amp=False
    monkeypatch.setenv(PRECISION_ENV, "auto")
    assert precision_in_effect(CPU) == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        set_precision("fp16")
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ValueError, match=r"\$NFTBENCH_PRECISION must be one of"):
        matmul_dtype()
    set_precision("bf16")
    with pytest.raises(ValueError, match="use precision fp32 or auto"):
        precision_in_effect(torch.device("mps"))


def committed_digits_records() -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((ROOT / "results" / "quick" / "records").glob("*.json"))]
    return [r for r in records if r["config"]["task"]["dataset"] == "digits"]


def test_auto_keeps_committed_ids_and_an_explicit_precision_gets_its_own(digits_task, monkeypatch):
    records = committed_digits_records()
    assert records, "results/quick/records holds the committed digits runs this test checks"
    monkeypatch.setenv(PRECISION_ENV, "auto")
    for r in records:
        cfg = r["config"]
        params = dict(cfg["attack"])
        attack = create_attack(params.pop("name"), **params)
        budget = (CleanBudget(None, per_class=int(cfg["budget"].split("/")[0])) if cfg["budget"].endswith("/class")
                  else CleanBudget(float(cfg["budget"])))
        run = run_config(digits_task, attack, cfg["defense"], cfg["defense_params"], budget, cfg["seed"])
        assert config_hash(run) == r["run_id"] and "precision" not in run
        assert victim_dir("runs", victim_config(digits_task, attack, cfg["seed"])).name == r["victim_id"]
    for setting in ("fp32", "bf16"):
        set_precision(setting)
        run = run_config(digits_task, attack, cfg["defense"], cfg["defense_params"], budget, cfg["seed"])
        assert run["precision"] == setting and config_hash(run) != r["run_id"]
        assert victim_config(digits_task, attack, cfg["seed"])["precision"] == setting


def test_cli_precision_option_on_every_command_that_trains_or_defends(capsys, runs_dir):
    for name in ("train-victim", "purify", "run", "bench", "sweep", "perf"):
        parser = build_parser([name])  # perf's options are built only when it is the command (a fast --help)
        subcommands = parser._subparsers._group_actions[0].choices
        assert "--precision {auto,fp32,bf16}" in subcommands[name].format_help(), name
    with pytest.raises(SystemExit) as e:
        main(["run", "--precision", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the option is applied before the (here failing) work starts
        main(["run", "--precision", "bf16", "--attack", "badnetz", "--device", "cpu", "--runs-dir", str(runs_dir)])
    assert get_precision() == "bf16"


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would be "
                    "emulated and slow, and auto never picks it here")
def test_a_short_victim_trains_and_records_under_bf16(digits_task, tmp_path):
    set_precision("bf16")
    task = copy.copy(digits_task)
    recipe = dict(digits_task.recipe(), epochs=BF16_EPOCHS)
    task.recipe = lambda: recipe
    model, meta, _ = get_victim(task, create_attack("badnets"), 0, tmp_path)
    assert meta["precision"] == "bf16" and meta["config"]["precision"] == "bf16"
    assert meta["torch_threads"] == torch.get_num_threads()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 weights, bf16 arithmetic
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    task.loss(model, next(task.iter_batches(task.clean_split(CleanBudget(0.05), 0), 8)))
    hook.remove()
    assert seen == [torch.bfloat16]
    m = meta["metrics"]
    assert m["clean_acc"] >= 0.75 and m["asr"] >= 0.75, m  # measured (seeds 0-2, 1-2 threads): 0.896-0.937, 0.887-1.0


def test_cli_precision_choices_are_the_suites():
    """The CLI restates the precision names (so --help imports no torch); they must stay the suite's."""
    from benchmarks import train_args
    from common import precision

    assert train_args.PRECISIONS == precision.PRECISIONS and train_args.PRECISION_ENV == precision.PRECISION_ENV


def test_an_unresolved_cell_has_the_precision_in_its_id(monkeypatch):
    """A cell whose task cannot be built is still recorded under an id; an explicit precision is part of it, as of
    every run id, so an fp32 and a bf16 sweep of one grid never share an error record."""
    from benchmarks.plan import unresolved_config, unresolved_run_id
    from benchmarks.run import RunConfig

    cfg = RunConfig(dataset="no-such-dataset")
    monkeypatch.setenv(PRECISION_ENV, "auto")
    auto_id = unresolved_run_id(cfg)
    assert "precision" not in unresolved_config(cfg)
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert unresolved_run_id(cfg) != auto_id and unresolved_config(cfg)["precision"] == "fp32"
    monkeypatch.setenv(PRECISION_ENV, "bf16")
    assert unresolved_run_id(cfg) not in (auto_id,) and unresolved_config(cfg)["precision"] == "bf16"


def test_a_cached_victim_of_another_precision_under_auto_is_noted(digits_task, digits_victim, tmp_path, monkeypatch,
                                                                  capsys):
    _, _, _, trained = digits_victim("none")
    monkeypatch.setenv(PRECISION_ENV, "auto")
    here = precision_in_effect(CPU)
    other = "fp32" if here == "bf16" else "bf16"
    d = victim_dir(tmp_path, victim_config(digits_task, None, 0))  # auto's id: the committed victims' ids
    d.mkdir(parents=True)
    for f in ("model.safetensors", "victim.json"):
        (d / f).write_bytes((trained / f).read_bytes())
    meta = json.loads((d / "victim.json").read_text())
    (d / "victim.json").write_text(json.dumps(meta | {"precision": other}))
    get_victim(digits_task, None, 0, tmp_path)
    assert f"victim {d.name} was trained in {other} (precision auto" in capsys.readouterr().err
    (d / "victim.json").write_text(json.dumps(meta | {"precision": here}))
    get_victim(digits_task, None, 0, tmp_path)
    assert "was trained in" not in capsys.readouterr().err
