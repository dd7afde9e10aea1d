"""`make gpu-check DEVICE=cpu`: the GPU check's script runs end to end on digits with tiny caps (issue 21)."""

import json

from benchmarks.gpu_check import run_check


def test_gpu_check_cpu_mode_runs_every_phase_and_writes_its_json(tmp_path, capsys):
    result = run_check("cpu", runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "perf"))
    written = json.loads((tmp_path / "perf" / "gpu-check-cpu.json").read_text())
    assert written["dataset"] == "digits" and written["environment"]["torch"]
    assert [(t["scale"], t["model"]) for t in written["training"]] == [("paper", "resnet-quick"), ("fast", "airbench")]
    assert all(t["images_per_s"] > 0 and t["gpu_util_pct"] is None for t in written["training"])
    assert [r["defense"] for r in written["defenses"]["rows"]] == ["nft", "anp", "i-bau"]
    assert all(r["time_s"] > 0 for r in written["defenses"]["rows"]), written["defenses"]["rows"]
    assert written["victim"]["max_steps"] == 3
    assert written["sweep"]["status"] == "ok", written["sweep"]
    assert "sweep: one NFT cell (2 steps) ok" in capsys.readouterr().out
    assert result["total_s"] == written["total_s"]
    # the capped victim was cached under its own id, next to (never instead of) a full victim's
    victims = list((tmp_path / "runs" / "victims").glob("*/victim.json"))
    assert [json.loads(v.read_text())["config"]["max_steps"] for v in victims] == [3]
