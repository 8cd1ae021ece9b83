"""What a study optimises: one objective (validation accuracy, the default) or several, traded
against each other on a Pareto front.

Every objective is read from what every trial already measures (its per-epoch history):

    val_acc      maximise  validation accuracy after the last epoch
    seconds      minimise  training time, summed over the trial's epochs (evaluation excluded)
    comm_rounds  minimise  communication rounds: parameter averages for local methods, one per
                           step for ordinary synchronous (data-parallel) training
    epochs       minimise  epochs trained

Optuna prunes single-objective studies only; a multi-objective study runs unpruned.
"""

from __future__ import annotations

from typing import Any

import optuna

from search.errors import UserError

DIRECTIONS = {"val_acc": "maximize", "seconds": "minimize", "comm_rounds": "minimize",
              "epochs": "minimize"}
DEFAULT = ["val_acc"]


def parse_objectives(value: Any, where: str) -> list[str]:
    """A list (or comma-separated text) of objective names, checked; `where` names the source."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise UserError(f"{where}: expected a list of objectives from {', '.join(DIRECTIONS)}")
    out = []
    for name in names:
        name = name.strip() if isinstance(name, str) else name
        if name not in DIRECTIONS:
            raise UserError(f"{where}: unknown objective {name!r}; expected one of "
                            f"{', '.join(DIRECTIONS)}")
        if name in out:
            raise UserError(f"{where}: {name} is listed twice")
        out.append(name)
    # val_acc, when traded, is the first value: tables and the bar rank trials by it
    return sorted(out, key=lambda n: n != "val_acc")


def pruner_for(pruner: str, objectives: list[str], announce: bool = False) -> str:
    """The pruner a study runs: Optuna prunes single-objective studies only, so several
    objectives run unpruned (`announce`: say so, when the user asked for a pruner)."""
    if len(objectives) == 1 or pruner == "none":
        return pruner
    if announce:
        from search.logs import say

        say(f"Optuna prunes single-objective studies only; this {len(objectives)}-objective "
            f"study ({', '.join(objectives)}) runs unpruned (pruner {pruner} not used)",
            "search run")
    return "none"


def directions(names: list[str]) -> list[str]:
    return [DIRECTIONS[n] for n in names]


def objective_values(names: list[str], history: list[dict[str, Any]]) -> list[float]:
    """The trial's objective values from its per-epoch metrics."""
    last = history[-1]
    measured = {"val_acc": float(last["val_acc"]),
                "seconds": float(sum(h["seconds"] for h in history)),
                # synchronous training averages gradients at every step
                "comm_rounds": float(last.get("comm_rounds", last.get("step", 0))),
                "epochs": float(last["epoch"])}
    return [measured[n] for n in names]


def study_objectives(study: optuna.Study) -> list[str]:
    """The objective names stored on a study (older studies: val_acc)."""
    return list(study.metric_names or DEFAULT)


def primary(trial: optuna.trial.FrozenTrial) -> float | None:
    """The first objective's value (val_acc whenever it is an objective), for tables."""
    return trial.values[0] if trial.values else None


def best_first(study: optuna.Study):
    """A sort key putting the best first by the first objective, in its direction."""
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def key(trial: optuna.trial.FrozenTrial) -> float:
        value = primary(trial)
        return float("inf") if value is None else sign * value

    return key


def pareto_numbers(study: optuna.Study) -> set[int]:
    """Trial numbers on the Pareto front (Optuna's best_trials); empty for one objective."""
    if len(study.directions) < 2:
        return set()
    return {t.number for t in study.best_trials}


def epochs_run(trial: optuna.trial.FrozenTrial) -> int:
    """Epochs a trial trained (multi-objective trials keep no intermediate values)."""
    return max(trial.intermediate_values, default=int(trial.user_attrs.get("epochs_run", 0)))
