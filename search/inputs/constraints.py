"""Constraints: what a trial must reach to count at all (`val_acc>=0.5`, `seconds<=600`).

Given as `--constraint "val_acc>=0.5"` (comma-separated for several), or `constraints:` (a
list of such strings) in a space or study file. Each is read from the same per-epoch history as
the objectives (`search.inputs.objectives`) and set on the finished trial with Optuna's own
`Trial.set_constraint` (value <= 0: satisfied), so Optuna's samplers steer away from
infeasible regions and `best_trial` / `best_trials` — the Pareto front in the table, status,
report, optuna-dashboard and the parent run's `pareto_trials` — leave infeasible trials out.
A trial that learned nothing is then never "optimal" only because it was cheap.
"""

from __future__ import annotations

import math
import re
from typing import Any

from search.errors import UserError
from search.inputs.objectives import DIRECTIONS, objective_values

_FORM = re.compile(r"^\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


def parse_constraints(value: Any, where: str) -> list[str]:
    """A list (or comma-separated text) of `metric>=number` / `metric<=number`, checked and
    normalised (`val_acc>=0.5`)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UserError(f"{where}: expected a list like [\"val_acc>=0.5\"]")
    out = []
    for item in items:
        m = _FORM.match(item) if isinstance(item, str) else None
        if m is None:
            raise UserError(f"{where}: {item!r}: expected METRIC>=NUMBER or METRIC<=NUMBER, "
                            f"METRIC one of {', '.join(DIRECTIONS)}")
        name, op, number = m.groups()
        if name not in DIRECTIONS:
            raise UserError(f"{where}: {item!r}: unknown metric {name!r}; expected one of "
                            f"{', '.join(DIRECTIONS)}")
        try:
            bound = float(number)
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise UserError(f"{where}: {item!r}: the bound must be a finite number")
        out.append(f"{name}{op}{bound:g}")
    return out


def violations(constraints: list[str], history: list[dict[str, Any]]) -> dict[str, float]:
    """{constraint: amount it is missed by} (<= 0: satisfied), as Optuna's set_constraint
    takes them."""
    out = {}
    for text in constraints:
        name, op, number = _FORM.match(text).groups()
        [measured] = objective_values([name], history)
        bound = float(number)
        out[text] = bound - measured if op == ">=" else measured - bound
    return out


def feasible(trial) -> bool:
    """False for a trial that misses a constraint (Optuna's record of it)."""
    return all(v <= 0 for v in getattr(trial, "constraints", {}).values())


def missed(trial) -> list[str]:
    """The constraints a trial misses, by name (Optuna reads the dashboard's unnamed list,
    `record_for_dashboard`, as keys "0", "1", ...: those are left out)."""
    return [k for k, v in getattr(trial, "constraints", {}).items() if v > 0 and not k.isdigit()]


#: the trial system attribute optuna-dashboard 0.21's plots read feasibility from: a list of
#: floats, <= 0 satisfied (the format Optuna 3's samplers wrote; Optuna 5 reads it as well)
DASHBOARD_KEY = "constraints"


def record_for_dashboard(storage: Any, trial_id: int, amounts: list[float]) -> None:
    """What optuna-dashboard's plots read to grey out an infeasible trial (it does not read
    `set_constraint`'s per-name records)."""
    storage.set_trial_system_attr(trial_id, DASHBOARD_KEY, [float(a) for a in amounts])
