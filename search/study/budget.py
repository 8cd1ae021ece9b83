"""A study's trial budget: `--n-trials N` is the study's total across commands and machines
(as Optuna's MaxTrialsCallback counts), so a rerun after a crash finishes the study instead of
adding N more, and two machines typing the same command share the N; `--add-trials K` raises the
total to K more than the study holds. The total is the study attribute `n_trials_total`."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna

from search.study.recovery import retried_numbers

State = optuna.trial.TrialState
TOTAL_ATTR = "n_trials_total"


def counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count toward the total: each one a worker took, once per retry chain (a
    failed attempt counts through its retry; a waiting trial — a queued retry, a fixed trial —
    counts once a worker takes it)."""
    retried = retried_numbers(trials)
    return sum(t.state != State.WAITING and t.number not in retried for t in trials)


def finished(trials: list[optuna.trial.FrozenTrial],
             by: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> int:
    """Trials that ended, once per retry chain (only those `by` accepts, if given)."""
    return len(ended(trials, by))


def ended(trials: list[optuna.trial.FrozenTrial],
          by: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> list[optuna.trial.FrozenTrial]:
    """The trials that ended, once per retry chain (the last attempt), that `by` accepts."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in retried
            and (by is None or by(t))]


def set_total(study: optuna.Study, n_trials: int | None, add_trials: int | None) -> int | None:
    """The study's total after this command: `--add-trials K` is K more than it holds,
    `--n-trials N` is N; None without either (a `--timeout` run: no total)."""
    if add_trials is not None:
        total = counted(study.get_trials(deepcopy=False)) + add_trials
    elif n_trials == 0:  # `--n-trials 0`: only tidy the study up; it keeps its total
        return 0
    elif n_trials is not None:
        total = n_trials
    else:
        return None
    study.set_user_attr(TOTAL_ATTR, total)
    return total


def room(study: optuna.Study, total: int | None) -> bool:
    """True while the study holds fewer trials than its total (one storage read)."""
    return total is None or room_left(study.get_trials(deepcopy=False), total) > 0


def room_left(trials: list[optuna.trial.FrozenTrial], total: int | None) -> int | float:
    """How many more trials the study's total allows, from its trials as read."""
    return float("inf") if total is None else max(0, total - counted(trials))


@contextlib.contextmanager
def ask_lock(study_name: str, needed: bool = True) -> Iterator[None]:
    """One worker at a time on this machine counts the study and asks (a file lock in the
    temporary folder, per study name): the workers of one command, or of several commands on
    one machine, then never ask past the total. Across machines the count and the ask are not
    one step: each machine may ask one trial past it when they ask at the same moment."""
    if not needed:
        yield
        return
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"search-ask-{digest}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
