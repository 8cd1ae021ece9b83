"""Study files: fixed trials enqueued exactly once (two workers, then a resume), the table with
reported beside measured values, the offline HTML report, and retrain's test accuracy."""

import re
import subprocess
import sys

import optuna
import pytest

from search.inputs.studyfile import STUDIES_DIR, load_study_file

STUDY = """
name: mini
space:
  fixed: {epochs: 1, dataset: digits, augment: none, batch_size: 64}
  params:
    optimizer: {type: categorical, choices: [adamw, sgdm]}
    lr: {type: categorical, choices: [1.0e-3, 1.0e-2, 3.0e-2]}
sampler: random
pruner: none
n_trials: 5
table: {rows: optimizer, columns: lr}
fixed_trials:
  - {label: R1, reported: 0.91, params: {optimizer: adamw, lr: 1.0e-3}}
  - {label: R2, reported: 0.85, params: {optimizer: sgdm, lr: 1.0e-2}}
  - {label: R3, params: {optimizer: sgdm, lr: 3.0e-2}}
"""


def _search(d, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=d, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("studies")
    (d / "mini.yaml").write_text(STUDY)
    r = _search(d, "run", "--study", "mini.yaml", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _search(d, "run", "--study", "mini.yaml", "--add-trials", "2")  # resume: 2 more
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _trials(d):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(d / "search-journal.log")))
    return optuna.load_study(study_name="mini", storage=storage).get_trials()


@pytest.mark.slow
def test_fixed_trials_run_exactly_once(study_dir):
    trials = _trials(study_dir)
    assert len(trials) == 7
    labels = [t.user_attrs["label"] for t in trials if "label" in t.user_attrs]
    assert sorted(labels) == ["R1", "R2", "R3"]
    by_label = {t.user_attrs["label"]: t for t in trials if "label" in t.user_attrs}
    assert by_label["R2"].params == {"optimizer": "sgdm", "lr": 0.01}
    assert all(t.state.is_finished() for t in trials)


def test_table_shows_labelled_rows_with_reported_and_measured(study_dir):
    r = _search(study_dir, "table", "--study", "mini")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "| Test # | Epochs | batch_size | beta/momentum | weight_decay | learning_rate | results |" in r.stdout
    rows = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| R")}
    assert set(rows) == {"R1", "R2", "R3"}
    assert "91.00%" in rows["R1"] and "85.00%" in rows["R2"]
    assert re.search(r"Val Acc: \d+\.\d\d%", rows["R1"])
    assert "Best val accuracy by optimizer and lr" in r.stdout
    assert "not CIFAR-100" in r.stdout


@pytest.mark.slow
def test_report_is_self_contained(study_dir, tmp_path):
    out = tmp_path / "mini.html"
    r = _search(study_dir, "report", "--study", "mini", "--output", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for title in ("Optimisation history", "Parameter importances", "Parallel coordinates",
                  "Learning curves", "Accuracy versus lr per optimizer"):
        assert title in text
    assert text.count('class="plotly-graph-div"') >= 5
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js is inlined, nothing fetched
    assert len(text) > 1_000_000


@pytest.mark.slow
def test_retrain_stores_test_accuracy(study_dir, monkeypatch):
    r = _search(study_dir, "retrain", "--study", "mini")
    assert r.returncode == 0, r.stderr[-2000:]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "search-journal.log")))
    info = optuna.load_study(study_name="mini", storage=storage).user_attrs["retrain"]
    assert 0.0 <= info["test_acc"] <= 1.0 and info["mlflow_run_id"]
    assert "test accuracy" in r.stdout
    # the weights are an MLflow model: uint8 images in, one logit per class out
    import mlflow
    import numpy as np

    before = mlflow.get_tracking_uri()
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: keep it from later tests' subprocesses
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study_dir}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{study_dir}/mlflow.db")
    try:
        model = mlflow.pyfunc.load_model(info["model_uri"])
    finally:
        mlflow.set_tracking_uri(before)
    logits = model.predict(np.zeros((3, 3, 32, 32), dtype=np.uint8))
    assert np.asarray(logits).shape == (3, 10)
    # told apart from the trials (issue 21): its name and kind, no val_acc, test_acc on the run
    # and on the logged model, which is named after the study and trial, with the test split linked
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir}/mlflow.db")
    run = client.get_run(info["mlflow_run_id"])
    n = info["trial"]
    assert run.info.run_name == f"retrain · trial-{n}" and run.data.tags["kind"] == "retrain"
    assert "val_acc" not in run.data.metrics and run.data.metrics["test_acc"] == info["test_acc"]
    # trained on train+val, tested on the test split: each a dataset input, named so
    assert {d.dataset.name: d.tags[0].value for d in run.inputs.dataset_inputs} == {
        "digits train+val": "training", "digits test": "testing"}
    assert run.data.tags["state"] == "retrain (test split)"
    logged = client.get_logged_model(info["model_uri"].rsplit("/", 1)[-1])
    assert logged.name == f"mini-trial-{n}"
    [metric] = logged.metrics
    assert metric.key == "test_acc" and metric.value == info["test_acc"]
    assert metric.dataset_name == "digits test"  # measured on the test split
    assert f"for {info['epochs']} epoch" in r.stdout and "MLflow run" in r.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
def test_shipped_study_files_load(name):
    sf = load_study_file(name)
    assert sf.name == name
    for row in sf.fixed_trials:
        assert set(row.params) <= {p.name for p in sf.space.params}
