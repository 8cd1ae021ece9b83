"""A study survives its own workers (issue 10), on a real PostgreSQL and MLflow server: a worker
SIGKILLed inside a `--workers 2` command is replaced by the command itself and its trial resumes;
SIGTERM to the parent alone stops everything cleanly; an unreachable MLflow server and every bad
value end as one line, exit 2, before anything is created."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.study.checkpoints import CheckpointStore
from tests.conftest import free_port

State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 5, dataset: digits, augment: final}
params:
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
"""


def _start(tmp_path, url, mlflow_uri, *extra):
    (tmp_path / "s.yaml").write_text(SPACE)
    return subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--storage", url,
         "--mlflow-uri", mlflow_uri, "--workers", "2", "--pruner", "none", "--heartbeat", "2",
         "--checkpoint-every", "1", *extra], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _running_trial_with_checkpoint(tmp_path, url, epochs_at_least=2, timeout=300):
    """A RUNNING trial whose checkpoint holds >= `epochs_at_least` epochs, and its worker pid."""
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            running = optuna.load_study(study_name="s", storage=url).get_trials(
                states=(State.RUNNING,))
        except KeyError:
            continue
        for t in running:
            saved = store.load(t.number) if store.path(t.number).is_file() else None
            if saved and saved["epoch"] >= epochs_at_least and "worker_pid" in t.user_attrs:
                return t, t.user_attrs["worker_pid"]
    pytest.fail("no trial reached its checkpoint in time")


def _alive(pid: int) -> bool:
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return False


def test_a_worker_killed_mid_trial_is_replaced_and_its_trial_resumes(postgres, mlflow_server,
                                                                     tmp_path):
    url = postgres.create_database("supervised")
    proc = _start(tmp_path, url, mlflow_server, "--n-trials", "4")
    victim, pid = _running_trial_with_checkpoint(tmp_path, url)
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"pid {pid}) killed by SIGKILL; trial {victim.number} re-queued; starting a " \
           "replacement" in err
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    assert retried == {victim.number}
    finished = [t for t in trials if t.state.is_finished() and t.number not in retried]
    assert len(finished) == 4 and all(t.state == State.COMPLETE for t in finished)
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == State.COMPLETE
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert "fail_reason" not in retry.user_attrs  # the dead attempt's marker is not inherited
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5]

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.info.run_id == victim.user_attrs["mlflow_run_id"]  # the same child run goes on
    assert run.info.status == "FINISHED" and "reason" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4, 5]
    exp = client.get_experiment_by_name("s")
    assert all(r.info.status != "RUNNING" for r in client.search_runs([exp.experiment_id]))


def test_sigterm_to_the_parent_alone_stops_every_worker_and_closes_every_run(
        postgres, mlflow_server, tmp_path):
    url = postgres.create_database("sigterm_parent")
    proc = _start(tmp_path, url, mlflow_server, "--n-trials", "6")
    _running_trial_with_checkpoint(tmp_path, url, epochs_at_least=1)
    pids = {t.user_attrs["worker_pid"] for t in optuna.load_study(
        study_name="s", storage=url).get_trials(states=(State.RUNNING,))}
    proc.send_signal(signal.SIGTERM)  # the parent only: what docker stop and Kubernetes send
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    time.sleep(1)
    assert not [p for p in pids if _alive(p)], "a worker outlived its command"
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert not [t for t in trials if t.state == State.RUNNING]
    stopped = [t for t in trials if t.state == State.FAIL]
    assert stopped and len([t for t in trials if t.state == State.WAITING]) == len(stopped)
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED"


@pytest.mark.slow
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.replace("epochs: 5", "epochs: 30"))
    proc = subprocess.Popen([sys.executable, "-m", "search", "run", "--space", "s.yaml",
                             "--workers", "2", "--n-trials", "2", "--pruner", "none",
                             "--checkpoint-every", "1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + 300
    while not (store.path(0).is_file() and store.path(1).is_file()) and time.time() < deadline:
        time.sleep(0.5)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    pids = {t.user_attrs["worker_pid"] for t in optuna.load_study(
        study_name="s", storage=storage).get_trials()}
    proc.kill()  # SIGKILL: the parent can do nothing; its workers must notice by themselves
    proc.wait()
    deadline = time.time() + 120
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], "orphaned workers kept training"
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert {t.state for t in trials if t.number < 2} == {State.FAIL}  # stopped, and re-queued
    assert len([t for t in trials if t.state == State.WAITING]) == 2


@pytest.mark.slow
def test_an_unreachable_mlflow_server_is_one_line_before_anything_exists(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    r = cli("run", "--space", "s.yaml", "--mlflow-uri", uri, "--n-trials", "1")
    assert time.time() - start < 30
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and uri in r.stderr, r.stderr
    assert not (tmp_path / "search-journal.log").exists()
    assert not (tmp_path / "mlflow.db").exists()


BAD_SPACES = {
    "mixed.yaml": ("fixed: {epochs: 2, dataset: digits}\nparams:\n  1: {type: int, low: 1, high: 2}"
                   "\n  lr: {type: float, low: 0.001, high: 0.01}\n", "params.1"),
    "inf.yaml": ("fixed: {epochs: 2, dataset: digits}\nparams:\n  lr: {type: float, low: 0.001, "
                 "high: .inf}\n", "params.lr.high"),
    "nan.yaml": ("fixed: {epochs: 2, dataset: digits, weight_decay: .nan}\nparams:\n  lr: "
                 "{type: float, low: 0.001, high: 0.01}\n", "weight_decay"),
    "huge-batch.yaml": ("fixed: {epochs: 2, dataset: digits}\nparams:\n  batch_size: "
                        "{type: categorical, choices: [64, 4096]}\n", "params.batch_size"),
    "study.yaml": ("space: ok.yaml\nn_trials: -2\n", "n_trials"),
}


@pytest.mark.parametrize("args, says", [
    (("--space", "ok.yaml", "--epochs", "0"), "--epochs"),
    (("--space", "ok.yaml", "--epochs", "-3"), "--epochs"),
    (("--space", "ok.yaml", "--n-trials", "-1"), "--n-trials"),
    (("--space", "ok.yaml", "--workers", "0"), "--workers"),
    (("--space", "ok.yaml", "--pack", "0"), "--pack"),
    (("--space", "ok.yaml", "--timeout", "0"), "--timeout"),
    (("--space", "ok.yaml", "--heartbeat", "0"), "--heartbeat"),
    (("--space", "big-batch.yaml", "--dataset", "digits"), "--dataset digits"),
    (("--space", "folder"), "is a directory"),
    *[(("--space", name), says) for name, (_, says) in BAD_SPACES.items() if name != "study.yaml"],
    (("--study", "study.yaml"), "study.yaml: n_trials"),
])
def test_every_bad_value_is_one_line_before_anything_is_created(cli, tmp_path, args, says):
    (tmp_path / "ok.yaml").write_text(SPACE)
    # valid on CIFAR-100 (40000 training images), not on digits (1149)
    (tmp_path / "big-batch.yaml").write_text(
        "fixed: {epochs: 2}\nparams:\n  batch_size: {type: categorical, choices: [64, 2048]}\n")
    (tmp_path / "folder").mkdir()
    for name, (text, _) in BAD_SPACES.items():
        (tmp_path / name).write_text(text)
    r = cli("run", *args, "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "search-journal.log").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_train_rejects_a_batch_larger_than_the_training_split(cli):
    r = cli("train", "--dataset", "digits", "--batch-size", "100000", "--epochs", "1")
    assert r.returncode == 2 and "larger than the digits training split" in r.stderr, r.stderr


def _stop_mlflow_server(server, port):
    """SIGTERM to the server's process group, then wait until nothing answers on its port."""
    import socket

    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.5)


def _mlflow_server(base, port):
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
         "--artifacts-destination", str(base / "artifacts"), "--workers", "1"],
        cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # see conftest
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    pytest.fail("mlflow server did not start")


@pytest.mark.slow
def test_an_mlflow_outage_mid_study_loses_no_trial_and_no_metric(tmp_path):
    base = tmp_path / "server"
    base.mkdir()
    port = free_port()
    server = _mlflow_server(base, port)
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "s.yaml").write_text(SPACE.replace("epochs: 5", "epochs: 4"))
    proc = subprocess.Popen([sys.executable, "-m", "search", "run", "--space", "s.yaml",
                             "--mlflow-uri", uri, "--n-trials", "3", "--pruner", "none",
                             "--checkpoint-every", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + 300
    while not store.path(0).is_file() and time.time() < deadline:
        time.sleep(0.3)
    os.killpg(server.pid, signal.SIGKILL)  # the tracking server goes away mid-trial
    server.wait()
    time.sleep(15)
    server = _mlflow_server(base, port)  # and comes back
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        _stop_mlflow_server(server, port)  # else the next one's health check may reach it
    assert proc.returncode == 0, err[-3000:]
    assert "does not answer; training goes on" in err and "answers again" in err
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [State.COMPLETE] * 3
    server = _mlflow_server(base, port)
    try:
        client = MlflowClient(tracking_uri=uri)
        for t in trials:
            run = client.get_run(t.user_attrs["mlflow_run_id"])
            assert run.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
            assert steps == [1, 2, 3, 4]  # the epochs of the outage were sent afterwards
    finally:
        os.killpg(server.pid, signal.SIGTERM)
