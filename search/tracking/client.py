"""MLflow tracking: one experiment per study, a parent run per study, a nested child per trial.

Logs straight through MlflowClient (optuna-integration's MLflowCallback is deprecated and
flattens runs). The tracking URI is `--mlflow-uri`, else MLFLOW_TRACKING_URI, else MLflow's own
default (a `mlflow.db` in the working directory).

Off the critical path: metrics, tags and run ends are queued and sent in order by a sender
thread while the next epoch trains, a run's consecutive metric batches merged into one
request; `drain` waits for the queue (a worker's end). Only a trial's run creation waits for
the server (nothing trains without its run).

Outages: a tracking server is checked before a study is created (`check_tracking_uri`: one line
within ~30 s when it does not answer). During a study, a trial's run is created with retries
for up to 10 minutes; queued calls wait while the server is away, one line says so on stderr,
and the queue is sent in order when it answers again (or when the worker ends). Optuna's
storage stays the record of every trial either way.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)

from search.errors import UserError
from search.logs import say
from search.tracking import run_link
from search.tracking.datasets import dataset_input, system_tags
from search.tracking.views import mark_best

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                 "seconds", "comm_rounds")


# MLflow's own HTTP retries default to 7 with exponential backoff and a 120 s timeout (minutes
# per call against a dead server); ours are shorter, and our callers decide what to wait for.
# MLflow reads these at each request; they are set (unless the user set them) when a client is
# made, not when this module is imported.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 # MLflow prints two "View run" lines per run end: our log says enough
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def open_client(uri: str | None) -> MlflowClient:
    """MLflow's client, or one line naming the URI when MLflow refuses it as the client is made
    (MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise UserError(f"MLflow at {uri}: {str(exc).splitlines()[0]}") from None


def check_tracking_uri(uri: str | None, seconds: float = 10.0) -> None:
    """Raises UserError (one line naming the URI) unless an http(s) tracking server answers
    within `seconds`, or a file store MLflow refuses. A database store (sqlite) needs no check."""
    import mlflow

    resolved = uri or mlflow.get_tracking_uri()
    if resolved.startswith("file:") or "://" not in resolved:
        # a file store: MLflow 3 refuses it (unless MLFLOW_ALLOW_FILE_STORE) when its client is
        # made -- say so before the study exists
        open_client(resolved)
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


def _server_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(t in text for t in ("locked", "connection", "timed out", "temporarily", "503",
                                   "502", "max retries", "read timeout"))


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
                    if not _server_busy(exc) or waited >= self._seconds:
                        raise
                    time.sleep(delay)
                    waited += delay
                    delay = min(delay * 2, 5.0)

        return call


class PendingRun:
    """A trial's run while the sender thread creates it: tracker calls take it in place of a
    run id (they are queued behind its creation), `id` once it exists."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.done = threading.Event()  # set once created (or once its creation failed for good)

    def wait(self, seconds: float | None = None) -> str | None:
        self.done.wait(seconds)
        return self.id


def run_id_of(run: str | PendingRun | None) -> str | None:
    """The run's id, or None while it is being created."""
    return run.id if isinstance(run, PendingRun) else run


class Tracker:
    """MLflow runs of one study."""

    def __init__(self, uri: str | None, study_name: str, command: str | None = None):
        raw = open_client(uri)
        self.command = command
        self.client = _RetryingClient(raw)
        self.patient = _RetryingClient(raw, seconds=600.0)  # for a trial's run, see above
        self.quick = _RetryingClient(raw, seconds=2.0)  # for what may be queued
        self.uri = self.client.tracking_uri
        self.study_name = study_name
        self.pending: collections.deque = collections.deque()  # calls not yet sent, in order
        self.outage = False
        self.cond = threading.Condition()  # guards `pending`; the sender thread waits on it
        self.sending = threading.Lock()  # one flush at a time (the sender's, or a caller's)
        self.sender: threading.Thread | None = None
        try:
            self.experiment_id = self._experiment(study_name)
        except MlflowException as exc:
            raise UserError(f"MLflow at {self.uri}: {str(exc).splitlines()[0]}") from None

    def _experiment(self, name: str) -> str:
        # a model-training experiment: MLflow 3 otherwise opens it in its GenAI view
        key, kind = "mlflow.experimentKind", "custom_model_development"
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if key not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, key, kind)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, tags={key: kind})
        except MlflowException:  # another worker created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def run_url(self, run_id: str | None = None) -> str | None:
        """The run's (or the experiment's, on the study's view: `set_view`) page in the MLflow
        UI, when the tracking URI is a server (`run_link`)."""
        return run_link(self.uri, self.experiment_id, run_id)

    def parent_run(self, run_id: str | None, study_name: str, space_text: str, space_hash: str,
                   settings: dict[str, Any] | None = None, description: str = "",
                   data: dict[str, Any] | None = None) -> str:
        """The study's parent run, marked RUNNING: `run_id` reopened, or (None) created with
        the settings as params, a description, the dataset and the space; returns its id."""
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=study_name, tags={
            "study": study_name, "space_hash": space_hash, "kind": "study",
            "mlflow.note.content": description, **system_tags(self.command)})
        run_id = run.info.run_id
        if settings:
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000])
                                                  for k, v in settings.items()])
        if data is not None:
            self.client.log_inputs(run_id, datasets=[dataset_input(data)])
        self.client.log_text(run_id, space_text, "space.yaml")
        return run_id

    def finish_parent(self, run_id: str, summary: dict[str, Any],
                      status: str | None = "FINISHED") -> None:
        """Logs the study's summary on its run and closes it: FINISHED, KILLED (stopped by a
        signal) or FAILED; None leaves it RUNNING (other commands still train)."""
        metrics = [Metric(k, float(v), int(time.time() * 1000), 0)
                   for k, v in summary.items() if isinstance(v, int | float)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        front = summary.get("pareto_front")
        if front is not None:  # the trade-off's best trials, one click from the study's run
            self.client.set_tag(run_id, "pareto_trials",
                                ", ".join(str(p["trial"]) for p in front)[:5000])
            self.client.log_dict(run_id, front, "pareto_front.json")
        best = [p["mlflow_run_id"] for p in front or summary.get("best", [])
                if p.get("mlflow_run_id")]
        mark_best(self.client, self.experiment_id, best, "Pareto" if front is not None else "best")
        if status is not None:
            self.client.set_terminated(run_id, status)

    def drain(self, seconds: float = 60.0) -> None:
        """At a trial's end where a record must be there, and at a worker's end: sends
        everything queued (an outage's backlog too), waiting up to `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(2.0)
        if self.pending:
            say(f"{len(self.pending)} MLflow updates could not be sent to {self.uri}; "
                "the Optuna storage holds every trial's values")

    def start_trial(self, parent_id: str, trial_number: int, params: dict[str, Any],
                    tags: dict[str, str], space_text: str, run_name: str | None = None,
                    retrain: bool = False,
                    on_created: Callable[[str], None] | None = None) -> str | PendingRun:
        """A trial's child run: nested under the study's run, its settings as params, its
        training data as a dataset input, the space as `space.yaml`. With `on_created` the
        sender thread creates it (the worker goes on; `on_created(run_id)` is called from that
        thread) and a PendingRun stands for it; else it is created now and its id returned."""
        tags = {MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: run_name or f"trial-{trial_number}",
                "study": self.study_name, "trial_number": str(trial_number),
                **system_tags(self.command), **tags}
        if on_created is None:
            run: str | PendingRun = self.patient.create_run(self.experiment_id, tags=tags).info.run_id
        else:
            run = PendingRun()
            self._send("_create_run", run, tags, on_created)
        self._send("log_batch", run, params=[Param(k, str(v)) for k, v in params.items()])
        if "dataset" in params:
            self._send("log_inputs", run, datasets=[dataset_input(params, retrain)])
        if space_text:
            self._send("log_text", run, space_text, "space.yaml")
        return run

    def _create_run(self, run: PendingRun, tags: dict[str, str],
                    on_created: Callable[[str], None]) -> None:
        """The sender's part of `start_trial`: the run created (retried for up to 10 minutes,
        as a run made at once would be), then `on_created`."""
        try:
            run.id = self.patient.create_run(self.experiment_id, tags=tags).info.run_id
        except Exception as exc:
            if not _server_busy(exc):
                run.done.set()  # never to be: the calls for it are dropped
            raise
        run.done.set()
        try:
            on_created(run.id)
        except Exception:  # the trial's own records; the worker sets them too
            pass

    def reopen(self, run_id: str, trial_number: int, run_name: str | None = None) -> None:
        """A retried trial continues its predecessor's run: RUNNING again, retry noted, the
        dead attempt's end markers (and a `failed ·` name) removed."""
        self.patient.update_run(run_id, status="RUNNING", name=run_name)
        self.patient.set_tag(run_id, "retried_as_trial", str(trial_number))
        tags = self.patient.get_run(run_id).data.tags
        for stale in ("reason", "optuna_state", "state"):
            if stale in tags:
                self.patient.delete_tag(run_id, stale)

    def _send(self, method: str, *args, **kwargs) -> None:
        """Queues the call for the sender thread, which sends the queue in order while the
        next epoch trains (and holds it while the server is away)."""
        with self.cond:
            self.pending.append((method, args, kwargs))
            if self.sender is None:
                self.sender = threading.Thread(target=self._send_forever, daemon=True,
                                               name="mlflow-sender")
                self.sender.start()
            self.cond.notify_all()

    def _send_forever(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
            if not self.flush():
                time.sleep(2.0)  # the server is away: try again in a while

    def _head(self) -> tuple[str, tuple, dict, int]:
        """The next call to make, with the queue's next metric batches of the same run merged
        into it (one request instead of one per epoch); and how many queued calls it covers."""
        method, args, kwargs = self.pending[0]
        if method != "log_batch" or set(kwargs) != {"metrics"}:
            return method, args, kwargs, 1
        metrics, count = list(kwargs["metrics"]), 1
        for m, a, k in itertools.islice(self.pending, 1, None):
            if (m, a, set(k)) != (method, args, {"metrics"}) or len(metrics) + len(k["metrics"]) > 1000:
                break
            metrics += k["metrics"]
            count += 1
        return method, args, {"metrics": metrics}, count

    def flush(self) -> bool:
        """Sends queued calls in order; False while the server still does not answer."""
        with self.sending:
            while True:
                with self.cond:
                    if not self.pending:
                        break
                    method, args, kwargs, count = self._head()
                try:
                    if method.startswith("_"):  # our own step, e.g. creating a run
                        getattr(self, method)(*args, **kwargs)
                    elif not any(isinstance(a, PendingRun) and a.id is None for a in args):
                        getattr(self.quick, method)(*(a.id if isinstance(a, PendingRun) else a
                                                      for a in args), **kwargs)
                except Exception as exc:
                    if _server_busy(exc):
                        if not self.outage:
                            self.outage = True
                            say(f"MLflow at {self.uri} does not answer; training goes on and "
                                "its metrics are kept to send when it is back")
                        return False
                    # refused for good (a deleted run): not worth holding
                    say(f"MLflow {method} dropped: {str(exc).splitlines()[0]}")
                with self.cond:
                    for _ in range(count):
                        self.pending.popleft()
        if self.outage:
            self.outage = False
            say(f"MLflow at {self.uri} answers again; queued updates sent")
        return True

    def last_step(self, run_id: str, key: str) -> int:
        """The last step at which the run logged `key` (0: none): the epochs a retry's run
        already holds."""
        try:
            history = self.patient.get_metric_history(run_id, key)
        except Exception:  # unknown: log every epoch, as before
            return 0
        return max((m.step for m in history), default=0)

    def tag(self, run_id: str, key: str, value: str) -> None:
        self._send("set_tag", run_id, key, value[:5000])

    def log_epoch(self, run_id: str, metrics: dict[str, Any]) -> None:
        now, step = int(time.time() * 1000), int(metrics["epoch"])
        batch = [Metric(k, float(metrics[k]), now, step) for k in EPOCH_METRICS if k in metrics]
        self._send("log_batch", run_id, metrics=batch)

    def end_trial(self, run_id: str, optuna_state: str, reason: str | None = None,
                  objectives: dict[str, float] | None = None, step: int = 0,
                  run_name: str | None = None, state: str | None = None) -> None:
        """Closes a child run: FINISHED for complete and for pruned (as Optuna's own MLflow
        integration does: pruning is a normal end; the run name starts `pruned@N ·` and the tag
        `optuna_state` is PRUNED), KILLED when stopped by a signal, FAILED for failed. The
        `state` tag (a column of the study's view, `view_link`) says it in words: complete,
        infeasible, pruned at epoch N, failed, stopped; `mark_best` adds best / Pareto. The
        objective values are logged at the trial's last epoch (`objective` for a single one,
        `objective_NAME` for each of several)."""
        status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "KILLED": "KILLED"}.get(
            optuna_state, "FAILED")
        if run_name:
            self._send("set_tag", run_id, MLFLOW_RUN_NAME, run_name)
        self._send("set_tag", run_id, "optuna_state", optuna_state)
        words = {"COMPLETE": "complete", "PRUNED": f"pruned at epoch {step}",
                 "KILLED": "stopped"}.get(optuna_state, "failed")
        self._send("set_tag", run_id, "state", state or words)
        if reason:
            self._send("set_tag", run_id, "reason", reason[:5000])
        if objectives:
            now = int(time.time() * 1000)
            names = (["objective"] if len(objectives) == 1
                     else [f"objective_{k}" for k in objectives])
            self._send("log_batch", run_id, metrics=[
                Metric(n, float(v), now, step) for n, v in zip(names, objectives.values(), strict=True)])
        self._send("set_terminated", run_id, RunStatus.to_string(RunStatus.from_string(status)))
