"""A study's life: created or resumed on its storage (exactly one process creates it), its space
checked, its fixed trials enqueued once, its parent MLflow run opened; and the last command to
leave closes that run. The same for workers started here and for a Slurm job array.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna

from search.errors import StorageUnavailable, UserError
from search.inputs.algorithms import make_pruner, make_sampler
from search.inputs.constraints import feasible
from search.inputs.objectives import best_first, directions, primary, pruner_for, study_objectives
from search.inputs.settings import RunSettings
from search.inputs.space import Space
from search.logs import redact, say
from search.study.measures import check_measures
from search.study.recovery import RetryDeadTrial
from search.study.storage import DEFAULT_STORAGE, open_storage, wait_for_attr
from search.tracking import PARENT_ATTR, RUN_ATTR, run_link
from search.tracking.client import Tracker
from search.tracking.views import set_view
from trainer.config import TrainConfig

State = optuna.trial.TrialState


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


def open_study(settings: RunSettings, space: Space, worker: int = 0) -> tuple[optuna.Study, bool]:
    """Creates the study, or loads it when it exists; returns (study, created_here). Exactly
    one process creates it, so one-time set-up (space attributes, MLflow parent) happens once."""
    storage = open_storage(settings.storage, settings.heartbeat,
                           RetryDeadTrial(settings.max_retry, settings.mlflow_uri),
                           settings.storage_patience)
    seed = None if settings.seed is None else settings.seed + worker
    sampler = make_sampler(settings.sampler, space, seed)
    pruner = make_pruner(pruner_for(settings.pruner, settings.objectives),
                         int(settings.trial_setting(space, "epochs")),
                         settings.pruner_startup_trials, settings.pruner_warmup_epochs)
    try:
        study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                    directions=directions(settings.objectives), sampler=sampler,
                                    pruner=pruner)
        study.set_metric_names(settings.objectives)  # the dashboard's axis names
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=settings.study_name, storage=storage,
                                  sampler=sampler, pruner=pruner)
        created = False
        deadline = time.monotonic() + 60  # its creator names the objectives right after
        while len(study.directions) > 1 and not study.metric_names and time.monotonic() < deadline:
            time.sleep(0.2)
    have = study_objectives(study) if study.metric_names or len(study.directions) == 1 else None
    if have != settings.objectives:
        raise UserError(f"study {settings.study_name!r} optimises {', '.join(have or ['?'])}, "
                        f"not {', '.join(settings.objectives)}; use --study NEW_NAME for a new "
                        "study")
    check_space(study, space, created)
    check_measures(study, settings, space)
    return study, created


def describe_study(settings: RunSettings) -> str:
    """The parent run's description (MLflow renders it as Markdown)."""
    storage = redact(settings.storage)
    flag = "" if storage == DEFAULT_STORAGE else f" --storage '{storage}'"
    name = settings.study_name
    return (f"Optuna study **{name}** ({', '.join(settings.objectives)}; sampler "
            f"{settings.sampler}, pruner {settings.pruner}) stored in `{storage}`. Each nested "
            f"run is one trial.\n\nWatch it live: `search dashboard{flag}` · its table: `search "
            f"table --study {name}{flag}` · a report: `search report --study {name}{flag}`")


def study_params(settings: RunSettings, workers: int) -> dict[str, Any]:
    """The study's settings as its parent run shows them (params) and the dashboard (one short
    `settings` attribute): the storage with its password masked."""
    params = settings.params(workers)
    params["storage"] = redact(settings.storage)
    return params


def _first_attributes(study: optuna.Study, settings: RunSettings, space: Space,
                      tracker: Tracker, params: dict[str, Any], data: dict[str, Any]) -> None:
    """What a new study carries for the dashboard and `optuna studies`: its settings, short and
    flat; where its MLflow runs are; what its trials learn from (saying when it is a stand-in)."""
    study.set_user_attr("settings", " ".join(f"{k}={v}" for k, v in params.items()
                                             if k not in ("storage", "space")))
    study.set_user_attr("mlflow", {"uri": redact(tracker.uri),
                                   "experiment_id": tracker.experiment_id})
    searched = next((p.choices for p in space.params if p.name == "dataset"), None)
    names = searched if searched and "dataset" not in settings.overrides else [data["dataset"]]
    study.set_user_attr("dataset", ", ".join(names) + (
        "" if set(names) == {"cifar100"} else " (not CIFAR-100)"))
    if settings.constraints:  # the dashboard's study note: what it cannot show by itself
        study.set_user_attr("constraints", ", ".join(settings.constraints))
        from optuna_dashboard import save_note

        save_note(study, f"**Constraints**: {', '.join(f'`{c}`' for c in settings.constraints)}. "
                  "A trial that misses one is *infeasible*: never among the best trials "
                  "(`search dashboard` and `search status` leave it out; plain `optuna-dashboard` "
                  "does not), greyed out in the plots, and its note says which it missed.")


def open_run(settings: RunSettings, workers: int) -> tuple[optuna.Study, Tracker, str, int]:
    """Creates or resumes the study and its parent MLflow run (settings, description, dataset,
    fixed trials, table); returns (study, tracker, parent run id, epochs per trial)."""
    space = settings.load_space()
    study, created = open_study(settings, space)
    tracker = Tracker(settings.mlflow_uri, settings.study_name, settings.command)
    params = study_params(settings, workers)
    data = {**TrainConfig().to_dict(), **space.fixed, **settings.overrides}
    if created:
        _first_attributes(study, settings, space, tracker, params, data)
    known = study.user_attrs.get(PARENT_ATTR) if created else wait_for_attr(study, PARENT_ATTR)
    parent = tracker.parent_run(known, study.study_name, space.text, space.hash, params,
                                describe_study(settings), data)
    if known is None:
        study.set_user_attr(PARENT_ATTR, parent)
    set_view(tracker.client, tracker.experiment_id, settings.objectives,  # the link's view
             [d == "minimize" for d in directions(settings.objectives)], [p.name for p in space.params])
    if created:
        say(f"MLflow experiment {tracker.run_url() or local_view(tracker)}", "search run")
    elif trials := len(study.get_trials(deepcopy=False)):  # said, so a resume is never a surprise
        say(f"study {study.study_name!r} resumed ({trials} trials so far, in "
            f"{redact(settings.storage)}); --study NEW_NAME starts a separate one", "search run")
    enqueue_fixed_trials(study, settings.fixed_trials, created)
    if settings.table and created:
        study.set_user_attr("table", settings.table)
    return study, tracker, parent, int(settings.trial_setting(space, "epochs"))


def local_view(tracker: Tracker) -> str:
    """How to open a local store's runs: `mlflow ui` on it, then the study's view."""
    uri = tracker.uri
    here = uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).resolve() == (
        Path.cwd() / "mlflow.db").resolve()  # what `mlflow ui` reads by default
    ui = "mlflow ui" if here else f"mlflow ui --backend-store-uri {uri}"
    return f"{tracker.experiment_id}: run `{ui}`, then open {run_link('http://127.0.0.1:5000', tracker.experiment_id)}"


def leave_study(study: optuna.Study, tracker: Tracker, parent: str, status: str) -> None:
    """This command's last word on the study's parent run: its summary metrics, and its end
    (FINISHED, KILLED, FAILED) only when no other command still trains a trial of the study --
    the last command to leave closes it. A silent storage leaves it RUNNING: the trials in
    flight resume with the next command."""
    try:
        trials = study.get_trials(deepcopy=False)
    except StorageUnavailable:
        return
    others = [t.number for t in trials if t.state == State.RUNNING]
    summary: dict = {"n_trials": len(trials)}
    if len(study.directions) == 1:
        complete = [t for t in trials if t.state == State.COMPLETE and feasible(t)]
        if complete:
            best = min(complete, key=best_first(study))
            summary["best_value"] = primary(best)
            summary["best"] = [{"trial": best.number,
                                "mlflow_run_id": best.user_attrs.get(RUN_ATTR)}]
    else:
        summary["pareto_front"] = [{"trial": t.number, **dict(zip(
            study_objectives(study), t.values, strict=True)),
            "mlflow_run_id": t.user_attrs.get(RUN_ATTR)} for t in study.best_trials]
    tracker.finish_parent(parent, summary, None if others else status)
