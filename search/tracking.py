"""MLflow tracking: one experiment per study, a parent run per study, a nested child per trial.

Logs straight through MlflowClient (optuna-integration's MLflowCallback is deprecated and
flattens runs). The tracking URI is `--mlflow-uri`, else MLFLOW_TRACKING_URI, else MLflow's own
default (a `mlflow.db` in the working directory).
"""

from __future__ import annotations

import functools
import subprocess
import time
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
                    text = str(exc).lower()
                    transient = any(t in text for t in (
                        "locked", "connection", "timed out", "temporarily", "503", "502"))
                    if not transient or waited >= self._seconds:
                        raise
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 5.0)

        return call


class Tracker:
    """MLflow runs of one study."""

    def __init__(self, uri: str | None, study_name: str):
        self.client = _RetryingClient(MlflowClient(tracking_uri=uri))
        self.uri = self.client.tracking_uri
        self.study_name = study_name
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

    def finish_parent(self, run_id: str, summary: dict[str, Any]) -> None:
        metrics = [Metric(k, float(v), int(time.time() * 1000), 0)
                   for k, v in summary.items() if isinstance(v, int | float)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.set_terminated(run_id, "FINISHED")

    def start_trial(self, parent_id: str, trial_number: int, params: dict[str, Any],
                    tags: dict[str, str], space_text: str) -> str:
        run = self.client.create_run(self.experiment_id, tags={
            MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: f"trial-{trial_number}",
            "study": self.study_name, "trial_number": str(trial_number),
            **({"git_commit": git_commit()} if git_commit() else {}), **tags,
        })
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_text(run_id, space_text, "space.yaml")
        return run_id

    def reopen(self, run_id: str, trial_number: int) -> None:
        """A retried trial continues its predecessor's run: RUNNING again, retry noted."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "retried_as_trial", str(trial_number))

    def log_epoch(self, run_id: str, metrics: dict[str, Any]) -> None:
        now, step = int(time.time() * 1000), int(metrics["epoch"])
        batch = [Metric(k, float(metrics[k]), now, step) for k in EPOCH_METRICS if k in metrics]
        self.client.log_batch(run_id, metrics=batch)

    def end_trial(self, run_id: str, optuna_state: str, reason: str | None = None,
                  value: float | None = None) -> None:
        """Closes a child run: FINISHED for complete, KILLED for pruned, FAILED for failed."""
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "KILLED": "KILLED"}.get(
            optuna_state, "FAILED")
        self.client.set_tag(run_id, "optuna_state", optuna_state)
        if reason:
            self.client.set_tag(run_id, "reason", reason[:5000])
        if value is not None:
            self.client.log_metric(run_id, "objective", value)
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))
