"""A third launcher is one file: `tests/shell_launcher.py`, registered as a package registers
a plugin (an entry point in the group `search.launchers`), with no change to `search/`. Its
workers, started through a shell script, run a study end to end; killed with their command,
the next command resumes their trials from their checkpoints; `search status` shows its job and
`search clean` lists its files."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from search.study.checkpoints import CheckpointStore
from search.study.recovery import retried_numbers
from tests.conftest import run_cli

State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 6, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
"""
RUN = ("run", "--space", "s.yaml", "--study", "s", "--shell", "--workers", "2", "--n-trials", "4",
       "--pruner", "none", "--checkpoint-every", "1")


def _install(site: Path) -> dict:
    """The launcher as an installed plugin: its module and a dist-info naming its entry point."""
    site.mkdir()
    shutil.copy(Path(__file__).parent / "shell_launcher.py", site / "shell_launcher.py")
    info = site / "shell_launcher-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shell-launcher\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[search.launchers]\nshell = shell_launcher:ShellLauncher\n")
    return {"PYTHONPATH": str(site)}


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log"))))


@pytest.mark.slow
def test_a_launcher_from_another_package_runs_resumes_and_shows(tmp_path):
    env = _install(tmp_path / "site")
    (tmp_path / "s.yaml").write_text(SPACE)
    first = subprocess.Popen([sys.executable, "-m", "search", *RUN], cwd=tmp_path,
                             env={**os.environ, **env}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    store = CheckpointStore(tmp_path / "checkpoints", "s")
    deadline = time.time() + 300
    running = []
    while time.time() < deadline and len(running) < 2:
        time.sleep(0.5)
        try:
            trials = _study(tmp_path).get_trials(states=(State.RUNNING,))
        except (KeyError, FileNotFoundError):
            continue
        running = [t for t in trials if store.path(t.number).is_file()
                   and (store.load(t.number) or {}).get("epoch", 0) >= 2]
    assert len(running) == 2, first.communicate(timeout=60)
    assert {t.user_attrs["shell_task"].split("_")[1] for t in running} == {"0", "1"}
    status = run_cli("status", cwd=tmp_path, env=env)
    assert status.returncode == 0 and "shell job" in status.stdout, status.stderr[-2000:]
    assert "2 worker(s) running" in status.stdout, status.stdout
    os.killpg(first.pid, signal.SIGKILL)  # the command and its workers, mid-trial
    first.communicate(timeout=60)

    again = run_cli(*RUN, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(tmp_path).get_trials()
    retried = retried_numbers(trials)
    finished = [t for t in trials if t.state.is_finished() and t.number not in retried]
    assert len(finished) == 4 and all(t.state == State.COMPLETE for t in finished)
    for killed in running:  # its retry went on from its checkpoint, not from the start
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == killed.number)
        assert retry.state == State.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 2
        assert retry.user_attrs["shell_task"] != killed.user_attrs["shell_task"]  # the new job's
    status = run_cli("status", cwd=tmp_path, env=env)
    assert "0 worker(s) running" in status.stdout, status.stdout
    clean = run_cli("clean", "--study", "s", cwd=tmp_path, env=env)
    assert "shell/s" in clean.stdout, clean.stdout + clean.stderr
