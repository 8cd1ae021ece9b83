"""`--n-trials` is the study's total across commands and machines: a rerun after a crash
finishes the study to its total, a rerun of a finished study runs nothing and says so, two
commands at once share the total, and `--add-trials K` runs K more."""

import signal
import subprocess
import sys
import time

import optuna
import pytest

from search.study.budget import finished
from search.study.recovery import retried_numbers

State = optuna.trial.TrialState
SPACE = """
name: b
fixed: {optimizer: adamw, dataset: digits, augment: none, epochs: 3, val_fraction: 0.5}
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""
RUN = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--pruner", "none"]


def trials(tmp_path):
    """The study's trials ([] until its first command has created it)."""
    if not (tmp_path / "search-journal.log").exists():
        return []
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    try:
        return optuna.load_study(study_name="b", storage=storage).trials
    except KeyError:
        return []


@pytest.mark.slow
def test_a_rerun_after_a_kill_finishes_the_study_to_its_total(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    proc = subprocess.Popen([*RUN, "--n-trials", "4"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # killed once 2 of 4 finished, the third in flight
        time.sleep(0.3)
        ts = trials(tmp_path)
        if finished(ts) >= 2 and any(t.state == State.RUNNING for t in ts):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    r = subprocess.run([*RUN, "--n-trials", "4"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = trials(tmp_path)
    retried = retried_numbers(ts)
    assert sum(t.state == State.COMPLETE for t in ts) == 4 == finished(ts)
    assert all(t.state == State.FAIL for t in ts if t.number in retried)  # the killed attempt
    r = subprocess.run([*RUN, "--n-trials", "4"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and len(trials(tmp_path)) == len(ts)
    assert "already holds its 4 trials" in r.stderr and "--add-trials" in r.stderr
    r = subprocess.run([*RUN, "--add-trials", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and finished(trials(tmp_path)) == 5, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "search", "status"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("b (5 of 5 trials): 5 complete"), r.stdout


@pytest.mark.slow
def test_two_commands_at_once_share_the_total(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    procs = [subprocess.Popen([*RUN, "--n-trials", "4"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)]
    deadline = time.monotonic() + 300  # the second joins once the first has made the stores
    while time.monotonic() < deadline and not any(t.state == State.RUNNING
                                                  for t in trials(tmp_path)):
        time.sleep(0.3)
    procs.append(subprocess.Popen([*RUN, "--n-trials", "4"], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    # at most one more than the total: two workers may both ask at the last free place
    assert finished(trials(tmp_path)) in (4, 5)


@pytest.mark.slow
def test_add_trials_with_n_trials_is_one_line(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    r = cli("run", "--space", "s.yaml", "--n-trials", "4", "--add-trials", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--add-trials with --n-trials" in r.stderr
