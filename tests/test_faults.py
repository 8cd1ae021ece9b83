"""The faults a cluster really has (issue 17), met as a user meets them, on a real PostgreSQL
and MLflow server: a command frozen (SIGSTOP) past the heartbeat's grace and thawed after
another command took its trial over; PostgreSQL stopped for minutes; a truncated or garbage
checkpoint; a checkpoint disk that is full."""

import datetime
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
from search.study.recovery import retried_numbers
from tests.conftest import IN_CI, run_cli

State = optuna.trial.TrialState
SPACE = """
fixed: {{optimizer: sgdm, epochs: {epochs}, dataset: digits, augment: none}}
params:
  lr: {{type: float, low: 1.0e-3, high: 3.0e-2, log: true}}
"""


def _command(tmp_path, url, mlflow_uri, n_trials, *extra):
    """`search run` on study NAME = the database's name (one MLflow experiment per test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--storage", url,
         "--study", url.rsplit("/", 1)[1],
         "--mlflow-uri", mlflow_uri, "--pruner", "none", "--heartbeat", "2",
         "--keep-checkpoints", "--checkpoint-every", "1", "--n-trials", str(n_trials), *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def _study(url):
    return optuna.load_study(study_name=url.rsplit("/", 1)[1], storage=url)


def _wait(predicate, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            found = predicate()
        except (KeyError, optuna.exceptions.StorageInternalError):
            found = None
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _checkpointed(url, store, pid, epochs_at_least=2):
    """The RUNNING trials of process `pid` once each has a checkpoint of >= N epochs."""
    mine = [t for t in _study(url).get_trials(states=(State.RUNNING,))
            if t.user_attrs.get("worker_pid") == pid]
    if mine and all(store.path(t.number).is_file() and
                    (store.load(t.number) or {}).get("epoch", 0) >= epochs_at_least for t in mine):
        return mine
    return None


def _finished(trials):
    retried = retried_numbers(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


def _child_runs(mlflow_uri, name):
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return client, [r for r in runs if r.data.tags.get("kind") != "study"], \
        [r for r in runs if r.data.tags.get("kind") == "study"]


@pytest.mark.parametrize("pack", [1, 2])
def test_a_paused_command_drops_its_taken_over_trials_and_the_study_gets_its_total(
        postgres, mlflow_server, tmp_path, pack):
    epochs = 5
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=epochs))
    url = postgres.create_database(f"paused{pack}")
    mlflow_uri, name = mlflow_server, f"paused{pack}"
    paused = _command(tmp_path, url, mlflow_uri, 2, "--pack", str(pack))
    store = CheckpointStore(tmp_path / "checkpoints", name)
    victims = _wait(lambda: _checkpointed(url, store, paused.pid), "a checkpointed trial")
    os.kill(paused.pid, signal.SIGSTOP)
    frozen_at = time.time()
    # the study's total rises to 6 (--n-trials is the study's): the other command runs the rest
    other = _command(tmp_path, url, mlflow_uri, 6, "--pack", str(pack))
    numbers = {t.number for t in victims}

    def taken_over():
        trials = _study(url).get_trials()
        retries = [t for t in trials if t.system_attrs.get("failed_trial") in numbers]
        # every retry started by the other command and past the epoch it resumed from
        if len(retries) == len(numbers) and all(
                t.user_attrs.get("worker_pid") == other.pid and len(t.intermediate_values) >
                t.user_attrs.get("resumed_from_epoch", 99) for t in retries):
            return retries
        return None

    retries = _wait(taken_over, "the other command to take the paused trials over")
    thawed_at = time.time()
    os.kill(paused.pid, signal.SIGCONT)
    _, paused_err = paused.communicate(timeout=300)
    _, other_err = other.communicate(timeout=300)
    assert paused.returncode == 0, paused_err[-3000:]
    assert other.returncode == 0, other_err[-3000:]
    for err in (paused_err, other_err):
        assert "Traceback" not in err and "UpdateFinishedTrialError" not in err
    for n in numbers:
        assert f"trial {n} was taken over by another worker while this one was unresponsive" \
            in paused_err
    # paused past the grace (3 x --heartbeat 2) counted from its last beat, which may have come
    # up to one interval (2 s) before the freeze
    assert thawed_at - frozen_at > 6 - 2

    trials = _study(url).get_trials()
    finished = _finished(trials)
    assert len(finished) == 2 + 4 and all(t.state == State.COMPLETE for t in finished)
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    for victim in numbers:
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim)
        assert retry.state == State.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 2
        # the paused worker wrote no checkpoint after it lost the trial (its own attempt's file
        # is older than the takeover; the retry's file is the retry's)
        failed_at = next(t for t in trials if t.number == victim).datetime_complete
        written = datetime.datetime.fromtimestamp(store.path(victim).stat().st_mtime)
        assert written <= failed_at and written.timestamp() < thawed_at
    assert {t.number for t in retries} <= {t.number for t in finished}

    client, children, parents = _child_runs(mlflow_uri, name)
    assert len(children) == 6
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, epochs + 1)), (run.info.run_name, steps)  # none twice
        assert run.info.status == "FINISHED"
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_postgres_down_for_half_a_minute_fails_no_trial(postgres, mlflow_server, tmp_path):
    epochs = 15
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=epochs))  # mid-trial when it stops
    url = postgres.create_database("outage")
    first = _command(tmp_path, url, mlflow_server, 4)
    store = CheckpointStore(tmp_path / "checkpoints", "outage")
    _wait(lambda: _checkpointed(url, store, first.pid), "a checkpointed trial")
    second = _command(tmp_path, url, mlflow_server, 4)  # the study's total: 4
    _wait(lambda: _checkpointed(url, store, second.pid, 1), "the second command's trial")
    before = {t.number: max(t.intermediate_values, default=0)
              for t in _study(url).get_trials(states=(State.RUNNING,))}
    postgres.stop("fast")
    try:
        # 5 heartbeat graces (--heartbeat 2) and 4 of the seam's longest backoff (8 s): no
        # length past those changes what is tested
        time.sleep(30)
        # training went on without the database: each trial checkpointed epochs past the ones
        # it had reported when the database stopped
        during = {n: store.load(n)["epoch"] for n in before}
    finally:
        postgres.start()
    assert any(reached < epochs - 1 for reached in before.values()), before
    assert all(during[n] > reached for n, reached in before.items() if reached < epochs - 1), \
        (before, during)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    for proc, (_, err) in zip((first, second), outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "does not answer" in err and "answers again after" in err
        assert "Traceback" not in err and "An exception is raised during the commit" not in err
    trials = _study(url).get_trials()
    # no FAIL, no retry (a fifth only when both commands asked at the moment the study
    # reached its total)
    assert len(trials) in (4, 5) and all(t.state == State.COMPLETE for t in trials)
    for number, reached in before.items():  # trained on through the outage: nothing recomputed
        assert max(trials[number].intermediate_values) == epochs and reached >= 1
    _, children, parents = _child_runs(mlflow_server, "outage")
    assert all(r.info.status == "FINISHED" for r in children + parents)


def test_a_storage_silent_past_its_patience_stops_the_command_in_one_line(
        postgres, mlflow_server, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=15))  # mid-trial past the patience
    url = postgres.create_database("patience")
    proc = _command(tmp_path, url, mlflow_server, 1, "--storage-patience", "10")
    store = CheckpointStore(tmp_path / "checkpoints", "patience")
    [trial] = _wait(lambda: _checkpointed(url, store, proc.pid), "a checkpointed trial")
    postgres.stop("fast")
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        postgres.start()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "did not answer for" in line]
    assert len(lines) == 1 and "--storage-patience" in lines[0] and "***" not in url
    assert "resume from their checkpoints" in lines[0]
    assert store.load(trial.number)["epoch"] >= 2  # kept for the next command
    # the next command on the study finds the trial stale and resumes it from there
    time.sleep(7)
    done = run_cli("run", "--space", "s.yaml", "--study", "patience", "--storage", url,
                   "--mlflow-uri", mlflow_server,
                   "--pruner", "none", "--heartbeat", "2", "--n-trials", "1", "--checkpoint-every", "1",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    retry = next(t for t in _study(url).get_trials()
                 if t.system_attrs.get("failed_trial") == trial.number)
    assert retry.state == State.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 2


def _journal_trials(d):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(d / "search-journal.log")))
    return optuna.load_study(study_name="s", storage=storage).get_trials()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_checkpoint_is_moved_aside_and_the_trial_restarts(tmp_path, damage):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=12))
    args = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "1",
            "--pruner", "none", "--checkpoint-every", "1"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    _wait(lambda: store.path(0).is_file() and store.load(0)["epoch"] >= 2, "a checkpoint")
    proc.kill()
    proc.communicate()
    path = store.path(0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    again = run_cli("run", "--space", "s.yaml", "--n-trials", "1", "--pruner", "none",
                    "--checkpoint-every", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    err = again.stderr
    assert "Traceback" not in err and "weights_only" not in err
    said = [line for line in err.splitlines() if "cannot be used" in line]
    assert len(said) == 1 and str(path) in said[0], err
    assert "trial 1 (retry of trial 0) starts again from epoch 0" in err
    assert (path.parent / (path.name + ".corrupt")).is_file()
    retry = next(t for t in _journal_trials(tmp_path) if t.number == 1)
    assert retry.state == State.COMPLETE and "resumed_from_epoch" not in retry.user_attrs
    assert sorted(retry.intermediate_values) == list(range(1, 13))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    [run] = [r for r in client.search_runs(
        [client.get_experiment_by_name("s").experiment_id]) if r.data.tags.get("kind") != "study"]
    assert "restarted from epoch 0" in run.data.tags["checkpoint_discarded"]
    assert run.info.status == "FINISHED"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: too small for one checkpoint."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs: {made.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_checkpoint_disk_is_one_line_and_every_trial_completes(tmp_path, tiny_disk):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=12))
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--n-trials", "2",
         "--pruner", "none", "--checkpoint-every", "1", "--checkpoint-dir", str(tiny_disk)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def unsafe():  # read in this process: a `search status` per poll would take a core
        return (tmp_path / "search-journal.log").exists() and any(
            t.user_attrs.get("crash_safe") is False for t in _journal_trials(tmp_path))

    _wait(unsafe, "the trial to run without crash safety", timeout=120)
    status = run_cli("status", cwd=tmp_path).stdout
    assert "running without crash safety" in status and "trial 0" in status, status
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "enforce fail" not in err
    said = [line for line in err.splitlines() if "cannot write checkpoint" in line]
    assert len(said) == 1 and "No space left on device, errno 28" in said[0]
    assert str(tiny_disk) in said[0] and "without crash safety" in said[0]
    trials = _journal_trials(tmp_path)
    assert len(trials) == 2 and all(t.state == State.COMPLETE for t in trials)
    assert not list(Path(tiny_disk).rglob(".tmp-*"))  # no half-written file left behind
