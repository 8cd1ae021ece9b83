"""MLflow tracking: one experiment per study, a parent run per study, a nested child per trial.

Logs straight through MlflowClient (optuna-integration's MLflowCallback is deprecated and
flattens runs). The tracking URI is `--mlflow-uri`, else MLFLOW_TRACKING_URI, else MLflow's own
default (a `mlflow.db` in the working directory).

Outages: a tracking server is checked before a study is created (`check_tracking_uri`: one line
within ~30 s when it does not answer). During a study, a trial's run is created with retries
for up to 10 minutes (the worker waits: nothing trains without its run); per-epoch metrics,
tags and run ends that fail are queued in memory, training goes on, one line says so on
stderr, and the queue is sent in order when the server answers again (or when the worker
ends). Optuna's storage stays the record of every trial either way.
"""

from __future__ import annotations

import collections
import functools
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from search.errors import UserError
from search.storage import wait_for_attr

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                 "seconds", "comm_rounds")
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"


# MLflow's own HTTP retries default to 7 with exponential backoff and a 120 s timeout (minutes
# per call against a dead server); ours are shorter, and our callers decide what to wait for.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                     ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
    os.environ.setdefault(_key, _value)


def check_tracking_uri(uri: str | None, seconds: float = 10.0) -> None:
    """Raises UserError (one line naming the URI) unless an http(s) tracking server answers
    within `seconds`. Local stores (a path, sqlite) need no server."""
    import mlflow

    resolved = uri or mlflow.get_tracking_uri()
    if not resolved.startswith(("http://", "https://")):
        return
    deadline, reason = time.monotonic() + seconds, ""
    while True:
        try:
            with urllib.request.urlopen(f"{resolved.rstrip('/')}/health", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers: a server without /health (a proxy) is still a server
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise UserError(f"--mlflow-uri {resolved}: no MLflow tracking server answers ({reason}); "
                            "start it, or leave out --mlflow-uri to log to ./mlflow.db")
        time.sleep(1.0)


def _transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(t in text for t in ("locked", "connection", "timed out", "temporarily", "503",
                                   "502", "max retries", "read timeout"))


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class _RetryingClient:
    """MlflowClient whose calls retry for a while on errors (a busy sqlite file under many
    workers, a restarting tracking server) before giving up."""

    def __init__(self, client: MlflowClient, seconds: float = 60.0):
        self._client, self._seconds = client, seconds

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            delay, waited = 0.2, 0.0
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if not _transient(exc) or waited >= self._seconds:
                        raise
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 5.0)

        return call


class Tracker:
    """MLflow runs of one study."""

    def __init__(self, uri: str | None, study_name: str):
        raw = MlflowClient(tracking_uri=uri)
        self.client = _RetryingClient(raw)
        self.patient = _RetryingClient(raw, seconds=600.0)  # for a trial's run, see above
        self.quick = _RetryingClient(raw, seconds=2.0)  # for what may be queued
        self.uri = self.client.tracking_uri
        self.study_name = study_name
        self.pending: collections.deque = collections.deque()
        self.outage = False
        try:
            self.experiment_id = self._experiment(study_name)
        except MlflowException as exc:
            raise UserError(f"MLflow at {self.uri}: {str(exc).splitlines()[0]}") from None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def parent_run(self, study, space_text: str, space_hash: str, created: bool) -> str:
        """The study's parent run, marked RUNNING. The process that created the study creates
        it and stores its id on the study; the others wait for that id."""
        run_id = study.user_attrs.get(PARENT_ATTR) if created else wait_for_attr(study, PARENT_ATTR)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=study.study_name, tags={
                "study": study.study_name, "space_hash": space_hash, "kind": "study",
                **({"git_commit": git_commit()} if git_commit() else {}),
            })
            run_id = run.info.run_id
            self.client.log_text(run_id, space_text, "space.yaml")
            study.set_user_attr(PARENT_ATTR, run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def finish_parent(self, run_id: str, summary: dict[str, Any], status: str = "FINISHED") -> None:
        """Closes the study's run: FINISHED, KILLED (stopped by a signal) or FAILED."""
        metrics = [Metric(k, float(v), int(time.time() * 1000), 0)
                   for k, v in summary.items() if isinstance(v, int | float)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        front = summary.get("pareto_front")
        if front is not None:  # the trade-off's best trials, one click from the study's run
            self.client.set_tag(run_id, "pareto_trials",
                                ", ".join(str(p["trial"]) for p in front)[:5000])
            self.client.log_dict(run_id, front, "pareto_front.json")
        self.client.set_terminated(run_id, status)

    def drain(self, seconds: float = 60.0) -> None:
        """At a worker's end: sends what an outage queued, waiting up to `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(2.0)
        if self.pending:
            print(f"search: {len(self.pending)} MLflow updates could not be sent to {self.uri}; "
                  "the Optuna storage holds every trial's values", file=sys.stderr)

    def start_trial(self, parent_id: str, trial_number: int, params: dict[str, Any],
                    tags: dict[str, str], space_text: str) -> str:
        run = self.patient.create_run(self.experiment_id, tags={
            MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: f"trial-{trial_number}",
            "study": self.study_name, "trial_number": str(trial_number),
            **({"git_commit": git_commit()} if git_commit() else {}), **tags,
        })
        run_id = run.info.run_id
        self.patient.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.patient.log_text(run_id, space_text, "space.yaml")
        return run_id

    def reopen(self, run_id: str, trial_number: int) -> None:
        """A retried trial continues its predecessor's run: RUNNING again, retry noted, the
        dead attempt's end markers removed."""
        self.patient.update_run(run_id, status="RUNNING")
        self.patient.set_tag(run_id, "retried_as_trial", str(trial_number))
        tags = self.patient.get_run(run_id).data.tags
        for stale in ("reason", "optuna_state"):
            if stale in tags:
                self.patient.delete_tag(run_id, stale)

    def _send(self, method: str, *args, **kwargs) -> None:
        """Calls the client now, or queues the call while the server is away (in order)."""
        self.pending.append((method, args, kwargs))
        self.flush()

    def flush(self) -> bool:
        """Sends queued calls in order; False while the server still does not answer."""
        while self.pending:
            method, args, kwargs = self.pending[0]
            try:
                getattr(self.quick, method)(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):  # refused for good (a deleted run): not worth holding
                    print(f"search: MLflow {method} dropped: {str(exc).splitlines()[0]}",
                          file=sys.stderr)
                elif not self.outage:
                    self.outage = True
                    print(f"search: MLflow at {self.uri} does not answer; training goes on and "
                          "its metrics are kept to send when it is back", file=sys.stderr)
                    return False
                else:
                    return False
            self.pending.popleft()
        if self.outage:
            self.outage = False
            print(f"search: MLflow at {self.uri} answers again; queued updates sent",
                  file=sys.stderr)
        return True

    def log_epoch(self, run_id: str, metrics: dict[str, Any]) -> None:
        now, step = int(time.time() * 1000), int(metrics["epoch"])
        batch = [Metric(k, float(metrics[k]), now, step) for k in EPOCH_METRICS if k in metrics]
        self._send("log_batch", run_id, metrics=batch)

    def end_trial(self, run_id: str, optuna_state: str, reason: str | None = None,
                  objectives: dict[str, float] | None = None, step: int = 0) -> None:
        """Closes a child run: FINISHED for complete, KILLED for pruned, FAILED for failed. The
        objective values are logged at the trial's last epoch (`objective` for a single one,
        `objective_NAME` for each of several)."""
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "KILLED": "KILLED"}.get(
            optuna_state, "FAILED")
        self._send("set_tag", run_id, "optuna_state", optuna_state)
        if reason:
            self._send("set_tag", run_id, "reason", reason[:5000])
        if objectives:
            now = int(time.time() * 1000)
            names = (["objective"] if len(objectives) == 1
                     else [f"objective_{k}" for k in objectives])
            self._send("log_batch", run_id, metrics=[
                Metric(n, float(v), now, step) for n, v in zip(names, objectives.values(), strict=True)])
        self._send("set_terminated", run_id, RunStatus.to_string(RunStatus.from_string(status)))
