"""Study building: sampler, pruner, the objective, and create-or-resume on a storage.

The space's text and hash live on the study as user attributes; resuming with a different
space is refused.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from search.checkpoints import CheckpointStore
from search.commands import PRUNERS, SAMPLERS
from search.errors import UserError
from search.recovery import STOP, Interrupted, RetryDeadTrial, chain_root, mark_worker
from search.space import Space, parse_space
from search.storage import open_storage
from search.tracking import RUN_ATTR, Tracker
from trainer import Diverged, TrainConfig, train
from trainer.config import ConfigError


def make_sampler(name: str, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group: models lr jointly with the optimiser, and conditional
        # parameters (t_max only with cosine, ...) as their own groups
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True,
                                              group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise UserError(f"--sampler: unknown {name!r}; expected one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, epochs: int, startup_trials: int = 5,
                warmup_epochs: int = 0) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                           n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner: unknown {name!r}; expected one of {', '.join(PRUNERS)}")


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
    max_retry: int = 3
    checkpoint_dir: str | None = None
    keep_checkpoints: bool = False
    fixed_trials: list[dict[str, Any]] = field(default_factory=list)
    table: dict[str, str] | None = None

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


def wait_for_attr(study: optuna.Study, key: str, timeout: float = 60.0) -> Any:
    """A study attribute its creator (another process, maybe another machine) is about to set."""
    deadline = time.monotonic() + timeout
    while key not in (attrs := study.user_attrs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return attrs.get(key)


def check_space(study: optuna.Study, space: Space, created: bool) -> None:
    """Stores the space on a new study; refuses a study built from a different space."""
    attrs = study.user_attrs if created else {"space_hash": wait_for_attr(study, "space_hash"),
                                              **study.user_attrs}
    if attrs.get("space_hash") is None:
        study.set_user_attr("space_hash", space.hash)
        study.set_user_attr("space_yaml", space.text)
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
                           RetryDeadTrial(spec.max_retry, spec.mlflow_uri))
    epochs = int(spec.overrides.get("epochs", space.fixed.get("epochs", TrainConfig.epochs)))
    seed = None if spec.seed is None else spec.seed + worker
    sampler = make_sampler(spec.sampler, space, seed)
    pruner = make_pruner(spec.pruner, epochs, spec.pruner_startup_trials, spec.pruner_warmup_epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.study_name,
                                    direction="maximize", sampler=sampler, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler,
                                  pruner=pruner)
        created = False
    check_space(study, space, created)
    return study, created


class Objective:
    """objective(trial): sample, train with per-epoch report / should_prune, log to MLflow.

    Pruned trials end their MLflow run KILLED, diverged or broken ones FAILED with the reason
    (also stored on the trial as `fail_reason`). Each epoch is checkpointed; a retried trial
    resumes from its chain's checkpoint and continues the same MLflow run."""

    def __init__(self, space: Space, overrides: dict[str, Any], tracker: Tracker,
                 parent_run_id: str, checkpoints: CheckpointStore | None = None,
                 reaper: Callable[[optuna.Study], Any] | None = None):
        self.space, self.overrides = space, overrides
        self.tracker, self.parent_run_id = tracker, parent_run_id
        self.checkpoints, self.reaper = checkpoints, reaper
        self.current: int | None = None  # the trial number in progress, for a stop

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        mark_worker(trial)  # first: a retry carries its dead predecessor's worker attributes
        if self.reaper is not None:
            self.reaper(trial.study)
        values = {**self.space.sample(trial), **self.overrides}
        try:
            config = TrainConfig.from_dict(values)
        except ConfigError as exc:
            trial.set_user_attr("fail_reason", f"invalid configuration: {exc}")
            raise
        root = chain_root(trial.study._storage.get_trial(trial._trial_id))
        resume = self.checkpoints.load(root) if self.checkpoints else None
        run_id = (resume or {}).get("mlflow_run_id") or trial.user_attrs.get(RUN_ATTR)
        if run_id and root != trial.number:
            self.tracker.reopen(run_id, trial.number)
        else:
            tags = {"optimizer": config.optimizer, "space_hash": self.space.hash}
            if "label" in trial.user_attrs:
                tags["label"] = str(trial.user_attrs["label"])
            run_id = self.tracker.start_trial(self.parent_run_id, trial.number, config.to_dict(),
                                              tags, self.space.text)
        trial.set_user_attr(RUN_ATTR, run_id)
        trial.set_user_attr("config", config.to_dict())
        if resume is not None:
            trial.set_user_attr("resumed_from_epoch", int(resume["epoch"]))

        def on_epoch(metrics: dict[str, Any]) -> None:
            self.tracker.log_epoch(run_id, metrics)
            if "comm_rounds" in metrics:
                trial.set_user_attr("comm_rounds", metrics["comm_rounds"])
            trial.report(metrics["val_acc"], metrics["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {metrics['epoch']}")

        def on_checkpoint(state: dict[str, Any]) -> None:
            self.checkpoints.save(root, {**state, "mlflow_run_id": run_id})
            if STOP.raised:  # a safe point: this epoch is reported and saved
                raise Interrupted(f"interrupted after epoch {state['epoch']}; resumes from there")

        try:
            result = train(config, on_epoch, resume=resume,
                           on_checkpoint=on_checkpoint if self.checkpoints else None)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned_reason", str(exc))
            self.tracker.end_trial(run_id, "PRUNED", str(exc))
            self._cleanup(root)
            raise
        except (Interrupted, KeyboardInterrupt) as exc:
            trial.set_user_attr("fail_reason", str(exc) or "interrupted")
            self.tracker.end_trial(run_id, "KILLED", str(exc) or "interrupted")
            raise
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            trial.set_user_attr("fail_reason", reason)
            self.tracker.end_trial(run_id, "FAIL", reason)
            self._cleanup(root)
            raise
        self.tracker.end_trial(run_id, "COMPLETE", value=result.val_acc)
        self._cleanup(root)
        self.current = None
        return result.val_acc

    def _cleanup(self, root: int) -> None:
        if self.checkpoints is not None:
            self.checkpoints.remove(root)


# Exceptions that fail one trial and let the study go on; anything else ends the worker.
TRIAL_FAILURES = (Diverged, ConfigError)
