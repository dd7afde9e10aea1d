"""benchmarks.paper_compare: the paper's Table 1 beside measured grades, from records alone."""

import pytest
from test_leaderboard import make_record, write

from benchmarks.paper_compare import build, main


def cifar_record(grade: str, attack: str, defense: str, seed: int, acc: float, asr: float, secs: float,
                 status: str = "ok") -> dict:
    r = make_record(defense, seed, acc, asr, 0.5, secs, attack=attack, status=status)
    r["run_id"] = f"{grade}-{r['run_id']}"
    r["config"]["task"]["dataset"] = "cifar10"
    return r


@pytest.fixture
def grades(tmp_path):
    runs = {  # grade -> (attack, defence, seed) -> (C-ACC after, ASR after, seconds); victims at 0.99 / 1.0
        "fast": {("badnets", "nft", 0): (0.97, 0.02, 10), ("badnets", "nft", 1): (0.95, 0.04, 12),
                 ("badnets", "anp", 0): (0.90, 0.10, 60), ("badnets", "anp", 1): (0.92, 0.20, 48),
                 ("blend", "nft", 0): (0.96, 0.50, 10), ("blend", "anp", 0): (0.80, 0.00, 70),
                 ("sig", "nft", 0): (0.98, 0.90, 10)},
        "quick": {("badnets", "nft", 0): (0.90, 0.60, 5), ("badnets", "anp", 0): (0.80, 0.05, 30)},
    }
    folders = {}
    for grade, cells in runs.items():
        folders[grade] = tmp_path / grade
        for (attack, defense, seed), (acc, asr, secs) in cells.items():
            write(folders[grade] / "records", cifar_record(grade, attack, defense, seed, acc, asr, secs))
        write(folders[grade] / "records", cifar_record(grade, "badnets", "nft", 2, 0, 0, 0, "error"))
    return folders


def test_tables_hold_the_paper_and_each_grade(grades):
    lines = build({"fast": grades["fast"], "quick": grades["quick"]}).splitlines()
    # per attack: the paper's BadNets NFT cell (ASR 1.74; C-ACC 92.96 -> 90.82), each grade over its ok seeds
    assert "| badnets | nft | 1.7 / 2.1 | 3.0 ± 1.4 / 3.0 ± 1.4 (2) | 60.0 / 9.0 (1) |" in lines
    assert "| sig | nft | n/r | 90.0 / 1.0 (1) | - |" in lines
    # per defence, over BadNets (the one attack both grades ran): DER = (1 - ASR - C-ACC drop + 1) / 2 per run,
    # spread over seeds; ANP's time over NFT's per victim and seed is 6 and 4 on fast (median 5), 6 on quick
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith(("| nft |", "| anp |"))}
    assert rows["nft"] == ("| nft | badnets | 95.6 / 1.8 | 3.0 ± 1.4 | 97.0 / 3.0 ± 1.4 | 97.0 ± 1.4 (1) | 1.00 "
                           "| 60.0 | 40.0 / 9.0 | 65.5 (2) | 1.00 |")
    assert rows["anp"] == ("| anp | badnets | 92.6 / 5.9 | 15.0 ± 7.1 | 85.0 / 8.0 ± 1.4 | 88.5 ± 2.8 (2) | 5.00 "
                           "| 5.0 | 95.0 / 19.0 | 88.0 (1) | 6.00 |")


def test_rank_agreement_between_grades(grades):
    # three defences ranked in both grades; FT (added) swaps places with NFT and ANP keeps its own: ranks fast
    # (nft 1, anp 2, ft 3) against quick (nft 3, anp 2, ft 1) give rho = -1
    write(grades["fast"] / "records", cifar_record("fast", "badnets", "ft", 0, 0.50, 0.50, 20))
    write(grades["quick"] / "records", cifar_record("quick", "badnets", "ft", 0, 0.98, 0.0, 20))
    lines = build({"fast": grades["fast"], "quick": grades["quick"]}).splitlines()
    assert ("DER rank agreement (Spearman, over the 3 defences ranked in every grade): fast vs quick: ρ = -1.00."
            in lines)
    assert not any(line.startswith("DER rank agreement") for line in build({"fast": grades["fast"]}).splitlines())
    # a defence one grade never ran is left out of the agreement, not an error
    write(grades["quick"] / "records", cifar_record("quick", "badnets", "clp", 0, 0.95, 0.10, 1))
    assert ("DER rank agreement (Spearman, over the 3 defences ranked in every grade): fast vs quick: ρ = -1.00."
            in build({"fast": grades["fast"], "quick": grades["quick"]}).splitlines())


def test_only_defences_measured_on_the_most_attacks_are_ranked(grades):
    # the fast grade alone: NFT ran BadNets, Blend and SIG, ANP BadNets and Blend, FT (added here) Blend only;
    # a mean over fewer attacks is not comparable, so only NFT gets a rank
    write(grades["fast"] / "records", cifar_record("fast", "blend", "ft", 0, 0.97, 0.30, 20))
    lines = build({"fast": grades["fast"]}).splitlines()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith(("| nft |", "| anp |",
                                                                                          "| ft |"))}
    assert rows["nft"][1] == "badnets, blend, sig" and rows["nft"][5].endswith("(1)")
    assert rows["anp"][5].endswith("(-)") and rows["ft"][5].endswith("(-)")


def test_headline_table_gives_the_named_defences_in_order(grades, capsys):
    main(["--grade", f"fast={grades['fast']}", "--grade", f"quick={grades['quick']}", "--headline", "anp,nft"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| defence (badnets) | paper (14 attacks): ASR drop / C-ACC drop | fast: ASR after / C-ACC "
                        "drop (seeds), DER rank | quick: ASR after / C-ACC drop (seeds), DER rank |")
    assert lines[2:] == ["| anp | 92.6 / 5.9 | 15.0 ± 7.1 / 8.0 ± 1.4 (2), 2 | 5.0 / 19.0 (1), 1 |",
                         "| nft | 95.6 / 1.8 | 3.0 ± 1.4 / 3.0 ± 1.4 (2), 1 | 60.0 / 9.0 (1), 2 |"]
    # on the fast grade alone the first defence (ANP) sets the attacks: NFT's SIG run is left out, and NFT, ranked
    # over BadNets, Blend and SIG in the full table, gets no rank here; seed 1 has no Blend run, so no spread
    main(["--grade", f"fast={grades['fast']}", "--headline", "anp,nft"])
    assert capsys.readouterr().out.splitlines()[-1] == "| nft | 95.6 / 1.8 | 26.5 / 3.0 (1), - |"
    with pytest.raises(SystemExit) as e:
        main(["--grade", f"fast={grades['fast']}", "--grade", f"quick={grades['quick']}", "--headline", "nft,sau"])
    assert e.value.code == 2 and "--headline sau: not measured in any grade" in capsys.readouterr().err


def test_bad_grade_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--grade", f"empty={tmp_path}"])
    assert e.value.code == 2 and "no ok CIFAR-10 runs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--grade", "no-equals-sign"])
    assert e.value.code == 2


def test_out_file_holds_what_is_printed(grades, tmp_path, capsys):
    out = tmp_path / "compare.md"
    main(["--grade", f"fast={grades['fast']}", "--out", str(out)])
    assert out.read_text().startswith("Paper: Karim et al.")
    assert capsys.readouterr().out.strip() == out.read_text().strip()
