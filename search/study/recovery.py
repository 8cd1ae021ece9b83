"""Surviving dead workers and stops: retries, signals, stale trials.

- A trial whose worker died is failed and re-queued (Optuna's RetryHeartbeatStaleTrialCallback, up to
  `--max-retry` times); the retry resumes from the chain's last checkpoint and continues the
  same MLflow run. On PostgreSQL, Optuna's heartbeat finds such trials; on the embedded journal
  file, whose storage has no heartbeat, a worker reaps RUNNING trials of dead processes on its
  own machine (same host, process gone).
- SIGINT / SIGTERM: the running trial stops at the end of its epoch, its MLflow run is closed
  KILLED, and it is failed and re-queued so it can resume; a second signal stops at once. The
  command then exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
- A supervising parent (`--workers N`) reaps the trials of a worker it saw die at once
  (`reap_worker`), instead of waiting for the heartbeat's grace period.
- A worker whose parent is gone (even SIGKILLed) stops like on SIGTERM: no orphans.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import threading
import warnings
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

from search import optuna_seam
from search.errors import Interrupted
from search.tracking import RUN_ATTR

__all__ = ["STOP", "Interrupted", "RetryDeadTrial", "chain_root", "mark_worker",
           "owned_by", "reap_dead_local_trials", "reap_worker", "requeue_interrupted", "retried_numbers"]

State = optuna.trial.TrialState
HOST = socket.gethostname()


class StopFlag:
    """First SIGINT/SIGTERM sets the flag (stop at the next epoch end); a second one raises
    KeyboardInterrupt at once. `signum` is the first signal, for the exit status."""

    def __init__(self) -> None:
        self.requested = False  # a stop was asked for: finish the epoch (or step), then stop
        self.signum: int | None = None

    def install(self, signals=(signal.SIGINT, signal.SIGTERM)) -> StopFlag:
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.request(signum)

    def request(self, signum: int) -> None:
        self.requested = True
        self.signum = self.signum or signum

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def follow(self, parent_stop, parent_pid: int, interval: float = 0.5) -> threading.Thread:
        """A spawned worker's watch: its parent asking it to stop (an Event), or its parent
        gone (re-parented: even a SIGKILLed parent leaves no orphan training on)."""

        def watch() -> None:
            while not self.requested:
                if parent_stop.wait(interval):
                    self.request(signal.SIGTERM)
                elif os.getppid() != parent_pid:
                    self.request(signal.SIGTERM)

        thread = threading.Thread(target=watch, daemon=True, name="parent-watch")
        thread.start()
        return thread


STOP = StopFlag()


def _retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    """Optuna's retry history of a trial, without its ExperimentalWarning on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def chain_root(trial: optuna.trial.FrozenTrial) -> int:
    """The first trial number of a retry chain: the key its checkpoints live under."""
    history = _retry_history(trial)
    return history[0] if history else trial.number


# what a retry must not inherit from the attempt it replaces
STALE_ATTRS = ("fail_reason", "pruned_reason", "worker_host", "worker_pid")  # its worker marks its own


class RetryDeadTrial:
    """Closes a dead or interrupted trial's MLflow run if still open, and re-queues the trial
    (Optuna's RetryHeartbeatStaleTrialCallback, without the dead attempt's failure markers)."""

    def __init__(self, max_retry: int, mlflow_uri: str | None):
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)
        self.mlflow_uri = mlflow_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                 reason: str = "worker died; the trial is retried", status: str = "FAIL") -> None:
        run_id = trial.user_attrs.get(RUN_ATTR)
        try:
            from search.tracking.client import Tracker

            tracker = Tracker(self.mlflow_uri, study.study_name)
            # killed after its run was created (the sender thread's) and before the trial
            # heard of it: the run is found by its trial number instead
            run_id = run_id or next((r.info.run_id for r in tracker.client.search_runs(
                [tracker.experiment_id], f"tags.trial_number = '{trial.number}' and "
                "attributes.status = 'RUNNING'", max_results=1)), None)
            if run_id and tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.end_trial(run_id, status, reason)
                tracker.drain(seconds=10)  # closed before the retry reopens it
        except Exception:  # tracking trouble must not block the retry
            pass
        clean = copy.copy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in STALE_ATTRS}
        self.retry(study, clean)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_and_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    handler: RetryDeadTrial, *why: str) -> bool:
    """Fails a RUNNING trial whose process is gone and re-queues it; False when someone else
    (a heartbeat, another worker) failed it first: the storage locks the row, one side wins."""
    won = optuna_seam.fail_if_running(study, trial)
    if won:
        handler(study, optuna_seam.get_trial(study, trial), *why)
    return won


def owned_by(trial: optuna.trial.FrozenTrial, pids: set[int] | frozenset[int]) -> bool:
    """Whether the trial was last run by one of these processes on this host (`mark_worker`)."""
    return trial.user_attrs.get("worker_host") == HOST and trial.user_attrs.get("worker_pid") in pids


def reap_dead_local_trials(study: optuna.Study, handler: RetryDeadTrial) -> int:
    """Embedded storage: fails and re-queues RUNNING trials whose worker on this host is gone."""
    reaped = 0
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        pid = t.user_attrs.get("worker_pid")
        if t.user_attrs.get("worker_host") != HOST or pid is None or pid == os.getpid():
            continue
        if not _alive(int(pid)):
            reaped += _fail_and_retry(study, t, handler)
    return reaped


def reap_worker(study: optuna.Study, pid: int, handler: RetryDeadTrial,
                reason: str = "worker died; the trial is retried", status: str = "FAIL") -> list[int]:
    """Fails and re-queues the RUNNING trials of a worker process on this host known to be gone
    (its parent saw it die); returns their numbers."""
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        if owned_by(t, {pid}) and _fail_and_retry(study, t, handler, reason, status):
            reaped.append(t.number)
    return reaped


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Trial numbers of failed attempts that a retry stands for (Optuna's retry history)."""
    return {n for t in trials for n in _retry_history(t)}


def mark_worker(trial: optuna.Trial, task: dict[str, str] | None = None) -> None:
    """Who runs the trial: this process on this host, and the launcher's task, if any (a task
    keeps its share over requeues: new pids, new nodes)."""
    trial.set_user_attr("worker_host", HOST)
    trial.set_user_attr("worker_pid", os.getpid())
    for key, value in (task or {}).items():
        trial.set_user_attr(key, value)


def requeue_interrupted(study: optuna.Study, number: int | None, handler: RetryDeadTrial) -> None:
    """After a stop, re-queues the trial this worker was running (Optuna has failed it)."""
    if number is None:
        return
    trial: Any = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is not None and trial.state == State.FAIL:
        handler(study, trial)
