"""Many workers on one study: a real PostgreSQL server, a real MLflow server over HTTP."""

import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.test_search import SPACE

State = optuna.trial.TrialState


def test_workers_share_a_postgres_study_and_log_to_an_mlflow_server(postgres, mlflow_server, tmp_path):
    url = postgres.create_database("workers")
    (tmp_path / "digits.yaml").write_text(SPACE.replace("epochs: 3", "epochs: 2"))
    common = ["--space", "digits.yaml", "--storage", url, "--mlflow-uri", mlflow_server,
              "--pruner", "none"]
    # two worker processes from one command, and the same command on another machine: they
    # share the study's total (--n-trials is the study's)
    first = subprocess.Popen([sys.executable, "-m", "search", "run", *common, "--workers", "2",
                              "--n-trials", "7"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    second = subprocess.run([sys.executable, "-m", "search", "run", *common, "--n-trials", "7"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]

    study = optuna.load_study(study_name="digits", storage=url)
    trials = study.get_trials()
    # 7 in all, nothing lost or duplicated (one more when two workers asked at the very moment
    # the study reached its total: at most one per worker asking then)
    assert len(trials) in (7, 8)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state == State.COMPLETE for t in trials)
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and len(children) == len(trials)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in children)
    assert all(len(client.get_metric_history(r.info.run_id, "val_acc")) == 2 for r in children)


@pytest.mark.slow
def test_unreachable_database_is_one_line_without_password(cli, tmp_path):
    (tmp_path / "digits.yaml").write_text(SPACE)
    r = cli("run", "--space", "digits.yaml", "--n-trials", "1", "--storage",
            "postgresql+psycopg2://alice:s3cret@127.0.0.1:1/nowhere")
    assert r.returncode == 2
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open storage" in lines[0] and "127.0.0.1:1" in lines[0]


def test_workers_through_the_grpc_storage_proxy(postgres, tmp_path):
    import time

    from tests.conftest import free_port

    url = postgres.create_database("grpc")
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "search", "storage-proxy", "--storage", url,
                              "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)
        (tmp_path / "digits.yaml").write_text(SPACE.replace("epochs: 3", "epochs: 1"))
        r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "digits.yaml",
                            "--storage", f"grpc://127.0.0.1:{port}", "--workers", "2",
                            "--n-trials", "4", "--pruner", "none"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    trials = optuna.load_study(study_name="digits", storage=url).get_trials()
    assert len(trials) == 4 and all(t.state == State.COMPLETE for t in trials)
