"""benchmarks/search_efficiency.py in miniature: studies stop at their epoch budget (at most one
trial over), pruned trials cost only the epochs they ran, and the table and verdict line print."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import search_efficiency as se
from search.inputs.studyfile import load_study_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_study_spends_its_budget_counting_the_epochs_actually_run():
    sf = load_study_file("seed-adamw")
    overrides = {"dataset": "digits", "epochs": 2, "augment": "none"}
    for strategy in ("tpe-hyperband", "grid"):
        r = se.run_study(strategy, 0, sf.space.text, str(sf.space.path),
                         [vars(f) for f in sf.fixed_trials], overrides, budget=5)
        assert r["spent"] == sum(r["trial_epochs"])  # pruned trials count what they ran
        assert 5 <= r["spent"] < 5 + 2  # stops at the budget, over by less than one trial
        assert all(0 < e <= 2 for e in r["trial_epochs"])
        assert len(r["curve"]) == r["trials"] - r["pruned"]
        assert [e for e, _ in r["curve"]] == sorted(e for e, _ in r["curve"])


@pytest.mark.slow
def test_the_benchmark_prints_its_table_and_verdict(tmp_path, capsys):
    assert se.main(["--study", "seed-adamw", "--budget", "4", "--epochs", "2", "--repeats", "1",
                    "--strategies", "random,grid", "--jobs", "2",
                    "--plot", str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("search efficiency: seed-adamw (space adamw.yaml, grid of 10 rows) on digits, 2-epoch")
    assert any(line.startswith("random ") for line in out)
    assert any(line.startswith("grid ") for line in out)
    assert out[-1].startswith("tpe_hyperband_vs_random: n/a") and ", grid: " in out[-1]
    assert (tmp_path / "curve.png").stat().st_size > 10_000


@pytest.mark.slow
def test_in_flight_studies_run_through_the_packed_worker_loop(tmp_path):
    sf = load_study_file("seed-adamw")
    overrides = {"dataset": "digits", "epochs": 2, "augment": "none"}
    r = se.run_in_flight("random", 0, 3, sf.space.text, str(sf.space.path), overrides,
                         budget=5, workdir=str(tmp_path))
    # three asked together: the budget stops the asking, what is in flight finishes; a trial
    # completing in the second epoch of the pack is credited with the pack's 6 epochs, past
    # the budget of 5, so it does not count
    assert r["trials"] == 3 and r["spent"] == 6 and r["trial_epochs"] == [2, 2, 2]
    assert r["curve"] == []
    r = se.run_in_flight("random", 0, 3, sf.space.text, str(sf.space.path), overrides,
                         budget=6, workdir=str(tmp_path))
    assert r["trials"] == 3 and [e for e, _ in r["curve"]] == [6, 6, 6]
    assert r["rounds"] == 2 and [n for n, _ in r["round_curve"]] == [2, 2, 2]
    # ramped: two in flight until two are heard from (max(2, 2) stays two), so the same
    # first trials complete two epochs earlier; two more trials cost two more rounds
    ramped = se.run_in_flight("random+ramp2", 0, 3, sf.space.text, str(sf.space.path),
                              overrides, budget=6, workdir=str(tmp_path))
    assert ramped["trials"] == 4 and ramped["rounds"] == 4 and ramped["spent"] == 8
    assert ramped["curve"] == [(4, v) for _, v in r["curve"][:2]]


@pytest.mark.slow
def test_the_quick_in_flight_benchmark_runs_as_ci_runs_it(tmp_path):
    """`--quick`: widths 1 and 8, TPE + Hyperband and random search, a 16-epoch budget."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"),
                        "--quick", "--plot", str(tmp_path / "curve.png"), "--json",
                        str(tmp_path / "quick.json")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert out[0].startswith("search efficiency in flight: space adamw.yaml on digits (not "
                             "CIFAR-100), 2-epoch trials, budget 16 epochs")
    rows = [line.split()[:2] for line in out if line.split()[:1] in (["random"], ["tpe-hyperband"])]
    assert rows == [["tpe-hyperband", "1"], ["tpe-hyperband", "8"], ["random", "1"], ["random", "8"]]
    assert re.fullmatch(r"epochs_to_target_ratio_p8_vs_p1: \d+\.\d\d \(random: \d+\.\d\d\)",
                        out[-1]), out[-1]
    assert (tmp_path / "curve_in_flight.png").stat().st_size > 10_000
    # the same table again from its file, as repeats run apart are put together; what the
    # studies trained on comes from the file (digits here), not from this command's defaults
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"),
                            "--in-flight", "1,8", "--budget", "16", "--target", "0.80",
                            "--dataset", "cifar100", "--tabulate", str(tmp_path / "quick.json"),
                            "--plot", str(tmp_path / "again.png")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.strip().splitlines()
    assert lines[0].startswith("search efficiency in flight, tabulated: 4 studies from ")
    assert "on digits (not CIFAR-100), 2-epoch trials, budget 16 epochs" in lines[0]
    assert lines[-1] == out[-1]


def test_the_published_in_flight_figures_reprint_from_their_results(tmp_path):
    """The benchmarks page's 64-in-flight verdict line is what `--tabulate` makes of the studies kept in
    benchmarks/results (so the published table can be checked and extended, not retyped)."""
    results = ROOT / "benchmarks" / "results"
    files = ",".join(str(results / f"digits-64-{n}.json")
                     for n in ("seeds0-2", "seeds3-5", "rampoff-seeds3-5"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"),
                        "--in-flight", "1,64", "--budget", "192", "--target", "0.85",
                        "--tabulate", files, "--plot", str(tmp_path / "p.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last == "epochs_to_target_ratio_p64_vs_p1: 1.36 (random: 1.09)"
    assert f"`{last}`" in (ROOT / "docs" / "benchmarks.md").read_text()
