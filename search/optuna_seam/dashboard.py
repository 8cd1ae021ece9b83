"""optuna-dashboard as `search dashboard` serves it: the same app, with its best trials chosen
the way Optuna chooses them.

optuna-dashboard 0.21 picks its "Best Trial" card and badges from every complete trial: it reads
neither Optuna 5's `Trial.set_constraint` records nor feasibility. A constrained study's infeasible
trials would then be "best" there while `search status`, `table`, the report and Optuna's own
`study.best_trial(s)` leave them out. `serve` recomputes the study page's best trials with Optuna
(`best_trial` / `best_trials`, which consider constraints). The plots read feasibility from the
trial's old-format `constraints` list, which `TrialSession.completed` writes beside Optuna's records
(`search.inputs.constraints.record_for_dashboard`).
"""

from __future__ import annotations

import sys
from typing import Any

import optuna

from search.logs import say


def best_trials(storage: Any, study_id: int) -> list[optuna.trial.FrozenTrial]:
    """The study's best trials as Optuna says: feasible ones only, the Pareto front for several
    objectives; none while no trial is complete and feasible."""
    study = optuna.load_study(study_name=storage.get_study_name_from_id(study_id),
                              storage=storage)
    if len(study.directions) > 1:
        return study.best_trials
    try:
        return [study.best_trial]
    except ValueError:  # nothing complete, or nothing feasible
        return []


def patch_best_trials(storage: Any) -> bool:
    """Makes the dashboard's study page list Optuna's best trials; False where this version of
    optuna-dashboard has no seam for it (then its best trials may include infeasible ones)."""
    try:
        from optuna_dashboard import _app
    except ImportError:
        return False
    original = getattr(_app, "serialize_study_detail", None)
    if original is None or getattr(original, "feasible_best", False):
        return original is not None

    def serialize_study_detail(study, best, *rest, **kwargs):
        if not study.system_attrs.get("preference:is_preferential", False):
            best = best_trials(storage, study._study_id)
        return original(study, best, *rest, **kwargs)

    serialize_study_detail.feasible_best = True  # type: ignore[attr-defined]
    _app.serialize_study_detail = serialize_study_detail
    return True


def serve(storage: Any, host: str, port: int) -> None:
    """optuna-dashboard on host:port for `storage`, best trials as Optuna picks them."""
    from optuna_dashboard import run_server

    if not patch_best_trials(storage):
        say("this optuna-dashboard may list infeasible trials among its best trials; "
            "`search status` and the report show the feasible ones", "search dashboard")
    sys.stderr.flush()
    run_server(storage, host=host, port=port)
