"""Constraints (issue 21): a trial that learned nothing is not 'optimal' because it was cheap.
A constrained two-objective study keeps infeasible trials off its front everywhere the front is
shown; a local method whose H outlasts the run is warned about, or refused as a fixed trial."""

import json
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 2, dataset: digits, augment: none}
params:
  lr: {type: categorical, choices: [0.0001, 0.05]}
  batch_size: {type: categorical, choices: [32, 64]}
objectives: [val_acc, seconds]
"""


def _study(d, name):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(d / "search-journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_infeasible_trials_stay_off_the_front_everywhere(cli, tmp_path):
    (tmp_path / "c.yaml").write_text(SPACE)
    r = cli("run", "--space", "c.yaml", "--sampler", "grid", "--n-trials", "4",
            "--constraint", "val_acc>=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    study = _study(tmp_path, "c")
    trials = study.get_trials()
    infeasible = {t.number for t in trials if t.values[0] < 0.5}
    feasible = {t.number for t in trials if t.values[0] >= 0.5}
    assert infeasible and feasible  # lr 1e-4 cannot reach 50 % in 2 epochs; 0.05 does
    for t in trials:  # Optuna's own record: <= 0 satisfied
        assert (t.constraints["val_acc>=0.5"] > 0) == (t.number in infeasible)
    front = {t.number for t in study.best_trials}
    assert front and front <= feasible
    word = "trial" if len(front) == 1 else "trials"
    assert f"Pareto front: {len(front)} {word} {sorted(front)}" in r.stdout  # the last line
    assert f"4 complete ({len(infeasible)} infeasible)" in r.stdout
    assert "best 0." not in r.stderr and "front" in r.stderr  # the progress lines
    for n in infeasible:  # its own line says so first, not only the study's front size
        assert f"trial {n} infeasible (val_acc>=0.5) val_acc" in r.stderr

    status = json.loads(cli("status", "--json").stdout)
    assert set(status[0]["pareto_front"]) == front
    table = cli("table", "--study", "c").stdout
    for n in infeasible:
        [row] = [line for line in table.splitlines() if line.startswith(f"| #{n} ")]
        assert "infeasible" in row and "Pareto" not in row
    report = cli("report", "--study", "c", "--output", "r.html")
    assert report.returncode == 0, report.stderr[-2000:]
    html = (tmp_path / "r.html").read_text()
    assert html.count("· infeasible") == len(infeasible)
    assert html.count("· Pareto") == len(front)
    exported = json.loads(cli("export", "--study", "c", "--format", "json").stdout)
    assert {row["number"] for row in exported if row["feasible"] is False} == infeasible

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("c").experiment_id])
    [parent] = [run for run in runs if run.data.tags.get("kind") == "study"]
    assert {int(n) for n in parent.data.tags["pareto_trials"].split(", ")} == front
    assert parent.data.params["constraints"] == "val_acc>=0.5"
    marked = {int(run.data.tags["trial_number"]) for run in runs if "infeasible" in run.data.tags}
    assert marked == infeasible
    # the runs table's state column: infeasible, or on the front, or complete
    states = {int(run.data.tags["trial_number"]): run.data.tags["state"] for run in runs
              if "trial_number" in run.data.tags}
    assert states == {n: "infeasible" if n in infeasible else "complete · Pareto" if n in front
                      else "complete" for n in feasible | infeasible}

    # optuna-dashboard (started by `search dashboard`) agrees: no infeasible trial is best, and
    # its plots can grey the infeasible ones out (the constraint list it reads)
    port = free_port()
    dash = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study._study_id}")
    finally:
        dash.terminate()
        dash.wait(timeout=30)
    assert {t["number"] for t in detail["best_trials"]} == front
    assert "**Constraints**: `val_acc>=0.5`" in detail["note"]["body"]  # the study's own note
    assert study.user_attrs["constraints"] == "val_acc>=0.5"
    for t in detail["trials"]:
        assert (max(t["constraints"]) > 0) == (t["number"] in infeasible)
        note = t["note"]["body"]
        assert ("**Infeasible**: misses `val_acc>=0.5`" in note) == (t["number"] in infeasible)


def _get_json(url: str, seconds: float = 120.0) -> dict:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_a_bad_constraint_is_one_line(cli, tmp_path):
    (tmp_path / "c.yaml").write_text(SPACE)
    for bad, says in (("val_acc>0.5", "expected METRIC>=NUMBER"),
                      ("accuracy>=0.5", "unknown metric 'accuracy'"),
                      ("val_acc>=1e999", "finite number")):
        r = cli("run", "--space", "c.yaml", "--constraint", bad)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "search-journal.log").exists()


LOCAL = """
fixed: {optimizer: sgdm, epochs: 1, dataset: digits, augment: none, local_workers: 2,
        batch_size: 64}
params:
  local_steps: {type: categorical, choices: [1000]}
"""


@pytest.mark.slow
def test_a_period_longer_than_the_run_is_warned_about_or_refused(cli, tmp_path):
    (tmp_path / "l.yaml").write_text(LOCAL)
    r = cli("run", "--space", "l.yaml", "--n-trials", "1", "--pruner", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "averages every 1000 local steps but runs only about 18: its workers never " \
           "average" in r.stderr
    (tmp_path / "s.yaml").write_text(
        "space: l.yaml\nfixed_trials:\n  - {label: H1000, params: {local_steps: 1000}}\n")
    refused = cli("run", "--study", "s.yaml", "--n-trials", "1")
    assert refused.returncode == 2
    assert "fixed_trials H1000: local_steps 1000 exceeds the ~18 steps" in refused.stderr
