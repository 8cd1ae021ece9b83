"""`search run --pack`: packed trials as a user runs them. Two workers with packs of 4 on a real
PostgreSQL and MLflow server finish exactly --n-trials, pruned slots refilled, every child run
closed with its trial's state; a packed trial killed mid-study resumes from its checkpoint."""

import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.study.checkpoints import CheckpointStore
from tests.conftest import killed_and_rerun

State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 3, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
  momentum: {type: float, low: 0.5, high: 0.95}
  batch_size: {type: categorical, choices: [32, 64]}
"""


def test_packed_workers_finish_exactly_n_trials(postgres, mlflow_server, tmp_path):
    url = postgres.create_database("packed")
    (tmp_path / "p.yaml").write_text(SPACE)
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "p.yaml", "--storage",
                        url, "--mlflow-uri", mlflow_server, "--workers", "2", "--pack", "4",
                        "--n-trials", "20", "--pruner-startup-trials", "2", "--seed", "0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = optuna.load_study(study_name="p", storage=url).get_trials()
    assert sorted(t.number for t in trials) == list(range(20))  # none lost, none duplicated
    for t in trials:  # a too-high lr may diverge: that trial fails alone, the pack goes on
        assert t.state in (State.COMPLETE, State.PRUNED) or (
            t.state == State.FAIL and "diverged" in t.user_attrs["fail_reason"]), t
    pruned = [t for t in trials if t.state == State.PRUNED]
    # (a trial's last epoch never prunes: 8 slots, so the second wave of 8 is pruned at epoch 1
    # or 2 and the third wave refills its slots)
    assert pruned, "the median pruner should stop some of 20 trials with lr down to 1e-3"
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in trials
               if t.state == State.COMPLETE)
    # pruned slots were refilled: trials started after an earlier trial of the study was pruned
    first_prune = min(t.datetime_complete for t in pruned)
    assert any(t.datetime_start > first_prune for t in trials)

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("p")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=100)
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 20
    by_id = {t.user_attrs["mlflow_run_id"]: t for t in trials}
    assert set(by_id) == {c.info.run_id for c in children}
    for c in children:
        t = by_id[c.info.run_id]
        assert c.info.status == {State.COMPLETE: "FINISHED", State.PRUNED: "FINISHED",
                                 State.FAIL: "FAILED"}[t.state]
        assert c.data.tags["optuna_state"] == t.state.name
        assert float(c.data.params["lr"]) == pytest.approx(t.params["lr"])
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_acc")]
        assert steps == sorted(t.intermediate_values)


@pytest.mark.slow
def test_killed_packed_trial_resumes_from_its_checkpoint(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.replace("epochs: 3", "epochs: 5")
                                     .replace("choices: [32, 64]", "choices: [64]"))
    cmd = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "2",
           "--pack", "2", "--pruner", "none", "--checkpoint-every", "1"]
    _, trials = killed_and_rerun(cmd, tmp_path, (0, 1), 2)
    assert [t.state for t in trials] == [State.FAIL, State.FAIL, State.COMPLETE, State.COMPLETE]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for retry in trials[2:]:
        first = trials[retry.system_attrs["failed_trial"]]
        resumed = retry.user_attrs["resumed_from_epoch"]
        assert resumed >= 2 and max(first.intermediate_values) - resumed <= 1
        assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5]
        run = client.get_run(retry.user_attrs["mlflow_run_id"])
        assert run.info.run_id == first.user_attrs["mlflow_run_id"]  # the same child run goes on
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigterm_stops_a_pack_after_its_epoch_and_requeues_every_trial(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.replace("epochs: 3", "epochs: 5")
                                     .replace("choices: [32, 64]", "choices: [64]"))
    proc = subprocess.Popen([sys.executable, "-m", "search", "run", "--space", "s.yaml",
                             "--n-trials", "2", "--pack", "2", "--pruner", "none",
                             "--checkpoint-every", "1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + 300
    while not store.path(0).is_file() and time.time() < deadline:
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [State.FAIL, State.FAIL, State.WAITING, State.WAITING]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for first in trials[:2]:
        assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
        assert store.load(first.number)["epoch"] == max(first.intermediate_values)
