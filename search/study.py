"""Study building: create-or-resume on a storage, and the trial side of the objective.

The space's text and hash live on the study as user attributes; resuming with a different
space is refused.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from search.algorithms import make_pruner, make_sampler
from search.checkpoints import CheckpointStore
from search.constraints import violations
from search.errors import AttemptLost, UserError
from search.objectives import DEFAULT as DEFAULT_OBJECTIVES
from search.objectives import directions, objective_values, study_objectives
from search.packing import DEFAULT_RAMP
from search.recovery import RetryDeadTrial, chain_root, mark_worker
from search.space import Space, parse_space
from search.storage import StorageBusy, no_waiting, open_storage, redact, wait_for_attr
from search.tracking import RUN_ATTR, Tracker
from trainer import TrainConfig
from trainer.config import ConfigError, optimiser_steps


@dataclass
class RunSpec:
    """Everything a worker process needs to join a study; plain data, so it pickles."""

    space_text: str
    space_path: str  # where the space came from, for messages
    study_name: str
    storage: str
    sampler: str = "tpe"
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 0
    n_trials: int | None = None
    timeout: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    mlflow_uri: str | None = None
    seed: int | None = None
    heartbeat: int = 10  # seconds, on RDB storages; a trial silent for 3x this is stale
    storage_patience: float = 600.0  # seconds a database may be silent before the command stops
    stop_within: float = 20.0  # seconds a signalled worker may take to stop (mid-epoch)
    max_retry: int = 3
    checkpoint_dir: str | None = None
    keep_checkpoints: bool = False
    pack: int | str = "auto"  # trials each worker trains together as one model (search.packing)
    ramp: int | None = DEFAULT_RAMP  # in flight <= max(ramp, trials heard from) (search.packed)
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    constraints: list[str] = field(default_factory=list)  # e.g. val_acc>=0.5 (search.constraints)
    fixed_trials: list[dict[str, Any]] = field(default_factory=list)
    table: dict[str, str] | None = None
    command: str | None = None  # the command line, as MLflow's run source

    def settings(self, workers: int) -> dict[str, Any]:
        """The study's settings as the parent run's params and the study's attributes."""
        out: dict[str, Any] = {"sampler": self.sampler, "pruner": self.pruner,
                               "objectives": ",".join(self.objectives),
                               "constraints": ",".join(self.constraints) or None,
                               "n_trials": self.n_trials,
                               "timeout": self.timeout, "workers": workers, "pack": self.pack,
                               "ramp": "off" if self.ramp is None else self.ramp,
                               "seed": self.seed, "storage": redact(self.storage),
                               "space": self.space_path}
        if self.pruner == "median":
            out.update(pruner_startup_trials=self.pruner_startup_trials,
                       pruner_warmup_epochs=self.pruner_warmup_epochs)
        out.update({f"override.{k}": v for k, v in self.overrides.items()})
        return {k: v for k, v in out.items() if v is not None}

    def load_space(self) -> Space:
        return parse_space(self.space_text, self.space_path)


def enqueue_fixed_trials(study: optuna.Study, fixed: list[dict[str, Any]], created: bool) -> int:
    """Enqueues the labelled trials no trial carries yet; returns how many were enqueued.

    The creating process enqueues them all, then marks the study; others wait for that mark so
    two commands starting together cannot both enqueue."""
    if not fixed:
        return 0
    if not created:
        wait_for_attr(study, "fixed_enqueued")
    have = {t.user_attrs.get("label") for t in study.get_trials(deepcopy=False)}
    count = 0
    for row in fixed:
        if row["label"] not in have:
            study.enqueue_trial(row["params"], user_attrs={
                "label": row["label"], "reported": row.get("reported")})
            count += 1
    if created:
        study.set_user_attr("fixed_enqueued", True)
    return count


def check_space(study: optuna.Study, space: Space, created: bool) -> None:
    """Stores the space on a new study; refuses a study built from a different space."""
    attrs = study.user_attrs if created else {"space_hash": wait_for_attr(study, "space_hash"),
                                              **study.user_attrs}
    if attrs.get("space_hash") is None:
        # the space's text is the parent MLflow run's space.yaml; the study keeps short attrs
        study.set_user_attr("space_hash", space.hash)
        study.set_user_attr("space_path", str(space.path))
    elif attrs["space_hash"] != space.hash:
        raise UserError(
            f"study {study.study_name!r} was created from a different space "
            f"(hash {attrs['space_hash']}, {attrs.get('space_path', '?')}); {space.path} has hash "
            f"{space.hash}. Use --study NEW_NAME to start a new study"
        )


def open_study(spec: RunSpec, space: Space, worker: int = 0) -> tuple[optuna.Study, bool]:
    """Creates the study, or loads it when it exists; returns (study, created_here). Exactly
    one process creates it, so one-time set-up (space attributes, MLflow parent) happens once."""
    storage = open_storage(spec.storage, spec.heartbeat,
                           RetryDeadTrial(spec.max_retry, spec.mlflow_uri), spec.storage_patience)
    epochs = int(spec.overrides.get("epochs", space.fixed.get("epochs", TrainConfig.epochs)))
    seed = None if spec.seed is None else spec.seed + worker
    sampler = make_sampler(spec.sampler, space, seed)
    pruner = make_pruner(spec.pruner if len(spec.objectives) == 1 else "none", epochs,
                         spec.pruner_startup_trials, spec.pruner_warmup_epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.study_name,
                                    directions=directions(spec.objectives), sampler=sampler,
                                    pruner=pruner)
        study.set_metric_names(spec.objectives)  # the dashboard's axis names
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        created = False
        deadline = time.monotonic() + 60  # its creator names the objectives right after
        while len(study.directions) > 1 and not study.metric_names and time.monotonic() < deadline:
            time.sleep(0.2)
    have = study_objectives(study) if study.metric_names or len(study.directions) == 1 else None
    if have != spec.objectives:
        raise UserError(f"study {spec.study_name!r} optimises {', '.join(have or ['?'])}, not "
                        f"{', '.join(spec.objectives)}; use --study NEW_NAME for a new study")
    check_space(study, space, created)
    return study, created


def compact_config(config: TrainConfig) -> dict[str, Any]:
    """The settings that differ from the defaults (TrainConfig fills the rest back in): a short
    trial attribute in optuna-dashboard instead of every knob."""
    defaults = TrainConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if v != defaults[k]}


class TrialRunner:
    """What every trial of a worker shares: the space, overrides, MLflow and checkpoints.
    `begin(trial)` turns an asked Optuna trial into a TrialSession, packed or not."""

    def __init__(self, space: Space, overrides: dict[str, Any], tracker: Tracker,
                 parent_run_id: str, checkpoints: CheckpointStore | None = None,
                 reaper: Callable[[optuna.Study], Any] | None = None,
                 objectives: list[str] | None = None, constraints: list[str] | None = None):
        self.space, self.overrides = space, overrides
        self.objectives = objectives or list(DEFAULT_OBJECTIVES)
        self.constraints = constraints or []
        self.tracker, self.parent_run_id = tracker, parent_run_id
        self.checkpoints, self.reaper = checkpoints, reaper

    def begin(self, trial: optuna.Trial) -> TrialSession:
        """Samples the trial, finds its chain's checkpoint, opens (or reopens) its MLflow run.
        Raises ConfigError (recorded as the trial's fail_reason) for an impossible combination."""
        mark_worker(trial)  # first: a retry carries its dead predecessor's worker attributes
        if self.reaper is not None:
            self.reaper(trial.study)
        values = {**self.space.sample(trial), **self.overrides}
        try:
            config = TrainConfig.from_dict(values)
        except ConfigError as exc:
            trial.set_user_attr("fail_reason", f"invalid configuration: {exc}")
            raise
        if config.local_steps > optimiser_steps(config):  # H longer than the whole run
            print(f"search: trial {trial.number} averages every {config.local_steps} local steps "
                  f"but runs only about {optimiser_steps(config)}: its workers never average "
                  "(0 communication rounds)", file=sys.stderr, flush=True)
        root = chain_root(trial.study._storage.get_trial(trial._trial_id))
        resume = self.checkpoints.load(root) if self.checkpoints else None
        discarded = self.checkpoints.discarded.pop(root, None) if self.checkpoints else None
        run_id = (resume or {}).get("mlflow_run_id") or trial.user_attrs.get(RUN_ATTR)
        label = trial.user_attrs.get("label")
        run_name = f"{label} · trial-{root}" if label else f"trial-{root}"
        if run_id and root != trial.number:
            self.tracker.reopen(run_id, trial.number, run_name)
        else:
            tags = {"optimizer": config.optimizer, "space_hash": self.space.hash}
            params = config.to_dict()
            if label:
                tags["label"] = str(label)
                if trial.user_attrs.get("reported") is not None:  # the notes' number beside ours
                    params["reported_val_acc"] = trial.user_attrs["reported"]
            run_id = self.tracker.start_trial(self.parent_run_id, trial.number, params,
                                              tags, self.space.text, run_name)
        trial.set_user_attr(RUN_ATTR, run_id)
        trial.set_user_attr("config", compact_config(config))
        if resume is not None:
            trial.set_user_attr("resumed_from_epoch", int(resume["epoch"]))
        if discarded is not None:  # said once by the store; the run and the trial say it too
            start = f"epoch {int(resume['epoch'])}" if resume else "epoch 0"
            print(f"search: trial {trial.number} (retry of trial {root}) starts again from "
                  f"{start}", file=sys.stderr, flush=True)
            trial.set_user_attr("checkpoint_discarded", discarded)
            self.tracker.tag(run_id, "checkpoint_discarded", f"{discarded}; restarted from {start}")
        if root == trial.number:
            self._note(trial, run_id)
        return TrialSession(self, trial, config, resume, run_id, root, run_name)

    def _note(self, trial: optuna.Trial, run_id: str) -> None:
        """The trial's note in optuna-dashboard (Markdown): its MLflow run as a link."""
        from optuna_dashboard import save_note

        url = self.tracker.run_url(run_id)
        where = (f"[MLflow run {run_id[:8]}]({url})" if url else
                 f"MLflow run `{run_id}` in {self.tracker.uri} (`mlflow ui --backend-store-uri "
                 f"{self.tracker.uri}`, then Experiments → {self.tracker.study_name})")
        try:
            save_note(trial, f"**{where}** — per-epoch metrics, params, dataset.")
        except Exception:  # a note is a convenience; never fail a trial for it
            pass


class TrialSession:
    """One trial attempt in flight: per-epoch reporting (report -> should_prune -> TrialPruned),
    its checkpoints, and the end of its MLflow run. Pruned trials end their run FINISHED and
    named so, diverged or broken ones FAILED with the reason (also the trial's `fail_reason`).

    Fencing: a worker paused past the heartbeat's grace (a suspended VM, a partition) has lost
    its attempt to a retry by the time it wakes. Before each epoch's side effects (MLflow
    metrics, Optuna report, checkpoint) and before any end, the session confirms that its
    attempt is still RUNNING in the storage (one read); a lost one raises AttemptLost and
    writes nothing more. Checkpoints are per attempt, so even a write racing the takeover
    cannot overwrite the retry's."""

    def __init__(self, runner: TrialRunner, trial: optuna.Trial, config: TrainConfig,
                 resume: dict[str, Any] | None, run_id: str, root: int, run_name: str):
        self.runner, self.trial, self.config = runner, trial, config
        self.resume, self.run_id, self.root = resume, run_id, root
        self.run_name = run_name
        self.contact = time.monotonic()  # the last time the storage confirmed the attempt
        self.crash_safe = True
        self.owed: list[dict[str, Any]] = []  # epochs not yet reported (a storage outage)

    def owned(self) -> bool:
        """True while this attempt is still the trial's RUNNING attempt in the storage."""
        state = self.trial.study._storage.get_trial(self.trial._trial_id).state
        if state == optuna.trial.TrialState.RUNNING:
            self.contact = time.monotonic()
            return True
        return False

    def confirm(self) -> None:
        if not self.owned():
            raise AttemptLost(self.lost_line())

    def lost_line(self) -> str:
        return (f"trial {self.trial.number} was taken over by another worker while this one was "
                f"unresponsive (no contact for {time.monotonic() - self.contact:.0f} s); "
                "dropping it")

    def on_epoch(self, metrics: dict[str, Any], last: bool = False) -> None:
        """The epoch's report: confirm the attempt, log it to MLflow, report it to Optuna, ask
        the pruner. While the storage does not answer (an outage, within --storage-patience)
        the epoch is owed instead and training goes on; owed epochs are sent, in order, once
        the storage confirms the attempt again (a lost one sends nothing). The last epoch
        waits for the storage: the trial cannot end without it."""
        self.owed.append(metrics)
        try:
            with no_waiting(self.trial.study._storage) if not last else contextlib.nullcontext():
                self._send_owed()
                # the last epoch never prunes: a trial that ran its whole budget has a value
                prune = (not last and len(self.runner.objectives) == 1
                         and self.trial.should_prune())
        except StorageBusy:
            return  # trains on; its checkpoint is its own attempt's file
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}")

    def _send_owed(self) -> None:
        """Confirms the attempt, then reports each owed epoch: Optuna first (it may meet the
        outage again), then MLflow (queued by the tracker, never fails), then drops it."""
        self.confirm()
        while self.owed:
            m = self.owed[0]
            if "comm_rounds" in m:
                self.trial.set_user_attr("comm_rounds", m["comm_rounds"])
            if len(self.runner.objectives) > 1:  # Optuna keeps no intermediate values for these
                self.trial.set_user_attr("epochs_run", int(m["epoch"]))
            else:
                self.trial.report(m["val_acc"], m["epoch"])
            self.runner.tracker.log_epoch(self.run_id, m)
            self.owed.pop(0)

    def values(self, history: list[dict[str, Any]]) -> list[float]:
        """The trial's objective values, in the study's order."""
        return objective_values(self.runner.objectives, history)

    def save(self, state: dict[str, Any]) -> None:
        """This attempt's checkpoint (after `on_epoch` confirmed the attempt). A failed write
        is one line from the store; the trial carries `crash_safe: false` until one succeeds,
        which `search status` shows."""
        if self.runner.checkpoints is None:
            return
        ok = self.runner.checkpoints.save(self.root, {**state, "mlflow_run_id": self.run_id},
                                          attempt=self.trial.number)
        if ok != self.crash_safe:
            self.crash_safe = ok
            self.trial.set_user_attr("crash_safe", ok)

    def pruned(self, reason: str, epoch: int) -> None:
        """Pruned: a normal end (FINISHED, as Optuna's own MLflow integration ends it), told
        apart from a complete run at a glance by its name's first word (`pruned@2 · trial-6`:
        MLflow's runs table cuts long names, and shows both as Finished)."""
        self.trial.set_user_attr("pruned_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "PRUNED", reason,
                                      run_name=f"pruned@{epoch} · {self.run_name}")
        self._cleanup()

    def interrupted(self, reason: str) -> bool:
        """Stopped by a signal: the checkpoint stays, so the re-queued trial resumes. False
        (nothing written) when the attempt was lost meanwhile."""
        if not self.owned():
            return False
        self.trial.set_user_attr("fail_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "KILLED", reason)
        return True

    def abandoned(self, reason: str) -> None:
        """The storage is gone: no storage write is possible. The run is closed KILLED (sent
        when MLflow answers), the checkpoint stays; the trial, RUNNING in the storage, is found
        stale and retried from it once the storage is back."""
        self.runner.tracker.end_trial(self.run_id, "KILLED", reason)

    def failed(self, reason: str) -> bool:
        if not self.owned():
            return False
        self.trial.set_user_attr("fail_reason", reason)
        self.runner.tracker.end_trial(self.run_id, "FAIL", reason,
                                      run_name=f"failed · {self.run_name}")
        self._cleanup()
        return True

    def completed(self, values: list[float], epoch: int,
                  history: list[dict[str, Any]] | None = None) -> None:
        """Complete: its constraints set on the trial (Optuna keeps infeasible trials off the
        front and the best), its run closed FINISHED."""
        missed = violations(self.runner.constraints, history or [])
        for text, amount in missed.items():
            self.trial.set_constraint(text, amount)
        if any(v > 0 for v in missed.values()):
            self.runner.tracker.tag(self.run_id, "infeasible", ", ".join(
                t for t, v in missed.items() if v > 0))
        self.runner.tracker.end_trial(self.run_id, "COMPLETE", objectives=dict(
            zip(self.runner.objectives, values, strict=True)), step=epoch)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.runner.checkpoints is not None:
            self.runner.checkpoints.remove(self.root)
