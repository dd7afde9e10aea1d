import csv
import json

import pytest
import torch
from torch import nn

from benchmarks.records import append_csv_row, der
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.hashing import config_hash


def test_der_formula():
    assert der(0.93, 0.91, 1.0, 0.02) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der(0.9, 0.9, 0.95, 0.95) == 0.5
    assert der(0.9, 0.95, 0.5, 0.9) == 0.5  # no credit for accuracy gains or ASR increases
    assert der(0.9, 0.1, 1.0, 1.0) == pytest.approx(0.1)
    assert der(0.9, 0.9, 1.0, 0.0) == 1.0


def test_config_hash_is_stable_and_order_free():
    a = {"task": {"dataset": "digits", "model": "x"}, "seed": 1}
    b = {"seed": 1, "task": {"model": "x", "dataset": "digits"}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "seed": 2})
    assert len(config_hash(a)) == 12 and int(config_hash(a), 16) >= 0


def test_csv_row_replaced_by_run_id(tmp_path):
    p = tmp_path / "r.csv"
    append_csv_row(p, {"run_id": "a", "status": "ok", "der": 0.5})
    append_csv_row(p, {"run_id": "b", "status": "ok"})
    append_csv_row(p, {"run_id": "a", "status": "error", "error": "x"})
    rows = list(csv.DictReader(open(p)))
    assert [r["run_id"] for r in rows] == ["b", "a"] and rows[1]["status"] == "error"


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_safetensors_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.3)
    save_checkpoint(tmp_path, model, {"hello": 1})
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == {"hello": 1}
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_checkpoint(tmp_path / "model.safetensors", fresh)
    for (k, v), (_, w) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_pickles_are_refused_and_never_executed(tmp_path):
    model = nn.Linear(3, 4)
    p = tmp_path / "model.pt"
    torch.save(model.state_dict(), p)  # a zip-based pickle
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(p, model)
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps(Boom(), protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(raw, model)
    assert not (tmp_path / "pwned").exists()


def test_truncated_and_wrong_architecture_are_clear_errors(tmp_path):
    model = nn.Linear(3, 4)
    save_checkpoint(tmp_path, model, {})
    p = tmp_path / "model.safetensors"
    data = p.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_checkpoint(cut, model)
    with pytest.raises(CheckpointError, match="does not fit this architecture.*shape"):
        load_checkpoint(p, nn.Linear(3, 5))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(p, nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors", model)
