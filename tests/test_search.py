"""`search run` end to end on digits: what lands in the storage and in MLflow, pruning, resume,
refusing a different space, status and export, and the dashboard answering its HTTP API."""

import json
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

SPACE = """
description: AdamW on digits, a test space
fixed: {optimizer: adamw, epochs: 3, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-5, high: 3.0e-3, log: true}
  batch_size: {type: categorical, choices: [64, 128]}
  weight_decay: {type: categorical, choices: [0.0, 1.0e-4]}
"""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """One study of 7 trials x 3 epochs on digits, run as a user runs it, pruning on."""
    d = tmp_path_factory.mktemp("study")
    (d / "digits.yaml").write_text(SPACE)
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "digits.yaml",
                        "--n-trials", "7", "--pruner", "median", "--pruner-startup-trials", "2",
                        "--seed", "1"], cwd=d, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _study(d):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(d / "search-journal.log")))
    return optuna.load_study(study_name="digits", storage=storage)


@pytest.mark.slow
def test_trials_land_in_the_embedded_storage(study_dir):
    study = _study(study_dir)
    states = [t.state for t in study.trials]
    assert len(states) == 7
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 2
    assert optuna.trial.TrialState.PRUNED in states  # the pruner really pruned
    for t in study.trials:
        assert t.user_attrs["mlflow_run_id"]
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.value == t.intermediate_values[3]
    assert study.user_attrs["space_hash"] and study.user_attrs["space_path"] == "digits.yaml"
    assert "space_yaml" not in study.user_attrs  # the text is the parent run's space.yaml
    assert study.metric_names == ["val_acc"]  # the dashboard's axis is named
    assert "sampler=tpe pruner=median" in study.user_attrs["settings"]
    assert study.user_attrs["dataset"] == "digits (not CIFAR-100)"
    # only what differs from the defaults: a short attribute in the dashboard
    assert study.trials[0].user_attrs["config"]["dataset"] == "digits"
    assert "momentum" not in study.trials[0].user_attrs["config"]


def test_each_trial_has_a_dashboard_note_naming_its_mlflow_run(study_dir):
    from optuna_dashboard import get_note

    study = _study(study_dir)
    trial = optuna.Trial(study, study.trials[0]._trial_id)
    assert study.trials[0].user_attrs["mlflow_run_id"] in get_note(trial)


@pytest.mark.slow
def test_mlflow_parent_and_children(study_dir):
    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir}/mlflow.db")
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 7
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    parent = parents[0]
    assert parent.data.params["sampler"] == "tpe" and parent.data.params["pruner"] == "median"
    assert parent.data.params["n_trials"] == "7" and parent.data.params["override.seed"] == "1"
    assert "search dashboard" in parent.data.tags["mlflow.note.content"]
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["digits"]
    study = _study(study_dir)
    by_id = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    for run in children:
        trial = by_id[run.info.run_id]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna_state"] == trial.state.name
        assert run.data.tags["trial_number"] == str(trial.number)
        assert run.data.params["optimizer"] == "adamw" and run.data.params["epochs"] == "3"
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == sorted(trial.intermediate_values)
        assert [m.value for m in history] == pytest.approx(
            [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)])
        for key in ("train_loss", "train_acc", "val_loss", "lr", "images_per_s"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(history)
        expected = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}[trial.state.name]
        assert run.info.status == expected
        # the runs table's state column tells what its status does not
        assert run.data.tags["state"] == (
            ("complete · best" if trial.number == study.best_trial.number else "complete")
            if trial.state.name == "COMPLETE" else
            f"pruned at epoch {max(trial.intermediate_values)}" if trial.state.name == "PRUNED"
            else "failed")
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"] == "search run"
        assert run.data.tags["command"].startswith("search run --space digits.yaml")
        [data] = run.inputs.dataset_inputs
        assert data.dataset.name == "digits" and json.loads(data.dataset.profile)["train"] == 1149
        if trial.state.name == "PRUNED":  # pruned: a normal end, told apart by its name
            assert run.data.tags["reason"].startswith("pruned at epoch")
            epoch = max(trial.intermediate_values)  # the state first: MLflow cuts long names
            assert run.info.run_name == f"pruned@{epoch} · trial-{trial.number}"
        if trial.state.name == "COMPLETE":  # the objective at the last epoch's step
            [objective] = client.get_metric_history(run.info.run_id, "objective")
            assert objective.step == 3 and objective.value == trial.value
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "space.yaml" in artifacts


@pytest.mark.slow
def test_resume_adds_trials_and_refuses_another_space(study_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "digits.yaml",
                        "--n-trials", "7"], cwd=study_dir, capture_output=True, text=True,
                       timeout=600)
    # --n-trials is the study's total: the study holds its 7, nothing runs
    assert r.returncode == 0 and "already holds its 7 trials" in r.stderr, r.stderr[-2000:]
    assert len(_study(study_dir).trials) == 7
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "digits.yaml",
                        "--add-trials", "1", "--epochs", "1"], cwd=study_dir,
                       capture_output=True, text=True, timeout=600)
    # --epochs changes what a trial's value measures: refused, nothing added (issue 45)
    assert r.returncode == 2 and "epochs 3 in the study, 1 in this command" in r.stderr
    assert len(_study(study_dir).trials) == 7
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "digits.yaml",
                        "--add-trials", "1"], cwd=study_dir,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]  # the same settings: one more trial
    assert len(_study(study_dir).trials) == 8
    (study_dir / "other.yaml").write_text(SPACE.replace("3.0e-3", "1.0e-2"))
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "other.yaml",
                        "--study", "digits", "--n-trials", "1"], cwd=study_dir,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "different space" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(_study(study_dir).trials) == 8


def test_status_and_export(study_dir):
    r = subprocess.run([sys.executable, "-m", "search", "status", "--json"], cwd=study_dir,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert not r.stderr.strip()  # no library warnings (Optuna's ExperimentalWarning was two lines)
    assert rows[0]["study"] == "digits" and rows[0]["counts"]["PRUNED"] >= 1
    assert rows[0]["best"]["mlflow_run_id"]
    for fmt in ("csv", "json"):
        r = subprocess.run([sys.executable, "-m", "search", "export", "--study", "digits",
                            "--format", fmt], cwd=study_dir, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert "mlflow_run_id" in r.stdout and "params_lr" in r.stdout
    table = json.loads(r.stdout)
    assert {row["state"] for row in table} >= {"COMPLETE", "PRUNED"}
    r = subprocess.run([sys.executable, "-m", "search", "export", "--study", "nope"],
                       cwd=study_dir, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr


def test_dashboard_serves_the_study(study_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--port", str(port)],
                            cwd=study_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        studies = body["study_summaries"]
        assert [s["study_name"] for s in studies] == ["digits"]
        sid = studies[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{sid}", timeout=10) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) >= 7
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_diverged_trial_fails_with_reason_and_the_study_goes_on(cli, tmp_path):
    (tmp_path / "div.yaml").write_text(
        "fixed: {optimizer: sgdm, epochs: 2, dataset: digits, augment: none}\n"
        "params:\n  lr: {type: categorical, choices: [1.0, 0.01]}\n")
    r = cli("run", "--space", "div.yaml", "--n-trials", "2", "--sampler", "grid",
            "--pruner", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    trials = {t.params["lr"]: t for t in optuna.load_study(study_name="div", storage=storage).trials}
    assert trials[1.0].state == optuna.trial.TrialState.FAIL
    assert trials[1.0].user_attrs["fail_reason"].startswith("diverged at epoch 1")
    assert trials[0.01].state == optuna.trial.TrialState.COMPLETE
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(trials[1.0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["reason"].startswith("diverged")
    assert run.info.run_name == f"failed · trial-{trials[1.0].number}"
    assert run.data.tags["state"] == "failed"


def test_missing_dataset_stops_before_the_study_starts(cli, tmp_path):
    r = cli("run", "--space", "adamw", "--n-trials", "1", "--data-root", str(tmp_path / "none"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar-100-python" in lines[0]
    assert not (tmp_path / "search-journal.log").exists()  # no study, no failed trial


def test_a_tracking_uri_mlflow_refuses_is_one_line(cli, tmp_path):
    # MLflow 3 refuses a file store when its client is made: one line naming the URI,
    # before anything exists
    (tmp_path / "digits.yaml").write_text(SPACE)
    uri = f"file://{tmp_path}/mlruns"
    r = cli("run", "--space", "digits.yaml", "--n-trials", "1", "--mlflow-uri", uri)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"search run: error: MLflow at {uri}: ")
    assert not (tmp_path / "search-journal.log").exists()  # said before the study exists


def test_table_shows_the_epochs_a_pruned_trial_ran(study_dir):
    r = subprocess.run([sys.executable, "-m", "search", "table", "--study", "digits"],
                       cwd=study_dir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = _study(study_dir)
    for line in r.stdout.splitlines():
        if line.startswith("| #"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            trial = study.trials[int(cells[0][1:])]
            assert cells[1] == str(max(trial.intermediate_values))  # run, not planned


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "hyperband", "sha"])
def test_a_trial_that_ran_its_whole_budget_is_never_pruned(cli, tmp_path, pruner):
    """One-epoch trials, pruning from the first trial on: every report is the last, so every
    trial completes with its value (issue 21: no 'pruned at epoch 1 of 1')."""
    (tmp_path / "digits.yaml").write_text(SPACE)
    r = cli("run", "--space", "digits.yaml", "--n-trials", "5", "--epochs", "1", "--pruner",
            pruner, "--pruner-startup-trials", "0", "--seed", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = _study(tmp_path).get_trials()
    assert len(trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.value for t in trials}) > 1  # some below the median: once they were pruned
