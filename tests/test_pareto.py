"""Multi-objective studies (issue 13) on digits: val_acc against communication rounds, with two
workers packing two trials each. Every trial carries both values, `search table` marks exactly
Optuna's best_trials as Pareto, the report draws the front, MLflow child runs carry both
objectives, and a pruner request gives one notice and an unpruned study."""

import json

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.inputs.studyfile import load_study_file

SPACE = """
fixed: {optimizer: sgdm, epochs: 2, dataset: digits, augment: none, batch_size: 64, local_workers: 2}
params:
  local_steps: {type: categorical, choices: [1, 4, 16]}
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
"""


@pytest.mark.slow
def test_a_two_objective_study_finds_its_pareto_front(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    r = cli("run", "--space", "s.yaml", "--objective", "val_acc,comm_rounds", "--n-trials", "8",
            "--workers", "2", "--pack", "2", "--pruner", "median", "--seed", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    notices = [line for line in r.stderr.splitlines() if "prunes single-objective" in line]
    assert len(notices) == 1 and "runs unpruned" in notices[0]
    assert "Pareto front:" in r.stdout

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == ["val_acc", "comm_rounds"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state.name == "COMPLETE" for t in trials)  # unpruned
    for t in trials:
        assert len(t.values) == 2
        # 1149 training images in 2 shards of 574, local batches of 32: 18 steps an epoch
        assert t.values[1] == 2 * 18 // t.params["local_steps"]  # an average every H steps
    front = {t.number for t in study.best_trials}

    table = cli("table", "--study", "s").stdout
    marked = {int(line.split("|")[1].strip()[1:]) for line in table.splitlines()
              if line.startswith("| #") and "Pareto" in line}
    assert marked == front

    status = cli("status", "--json")
    row = json.loads(status.stdout)[0]
    assert row["pareto_front"] == sorted(front)
    word = "trial" if len(front) == 1 else "trials"
    assert f"Pareto front (val_acc, comm_rounds): {len(front)} {word}" in cli("status").stdout

    report = cli("report", "--study", "s", "-o", "r.html")
    assert report.returncode == 0 and "Warning" not in report.stderr  # nothing users can act on
    html = (tmp_path / "r.html").read_text()
    assert "Pareto front (val_acc vs comm_rounds)" in html
    assert "Parameter importances for val_acc" in html  # which objective it ranks
    # the front and the rest told apart by a legend, not by colour bars over trial numbers
    section = html.split("<h2>Pareto front (")[1].split("<h2>")[0]
    assert '"name":"Pareto front"' in section and '"showscale":true' not in section
    assert section.count('"showscale":false') >= 2  # Optuna's bars over trial numbers hidden

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("s")
    runs = client.search_runs([exp.experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(children) == 8
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    for c in children:
        t = by_run[c.info.run_id]
        assert c.data.metrics["objective_val_acc"] == t.values[0]
        assert c.data.metrics["objective_comm_rounds"] == t.values[1]
    parent = next(x for x in runs if "mlflow.parentRunId" not in x.data.tags)
    assert {int(n) for n in parent.data.tags["pareto_trials"].split(", ")} == front

    # a different objective list on the same study is refused, before anything runs
    again = cli("run", "--space", "s.yaml", "--n-trials", "1")
    assert again.returncode == 2 and "optimises val_acc, comm_rounds" in again.stderr


def test_the_pareto_study_files_declare_their_objectives():
    assert load_study_file("local-sgd-pareto").options["objectives"] == ["val_acc", "comm_rounds"]
    assert load_study_file("large-batch-pareto").options["objectives"] == ["val_acc", "seconds"]
