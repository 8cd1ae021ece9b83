"""The operations a worker performs on its pack, each the right nesting of the seam's reads and
writes, so that a caller never orders primitives itself: ask a pack (`ask_pack`), read which of
its trials still run (`fence`), write its epoch's reports (`write_pack_reports`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from search.optuna_seam.reads import ask_new, fix_params, reads_once, storage_of, trial_id
from search.optuna_seam.resilient import StorageBusy, no_waiting
from search.optuna_seam.writes import create_trials, hand_back, write_reports, writes_together


def ask_pack(study: optuna.Study, slots: int, waiting: int,
             drawn: Callable[[], dict[str, Any] | None] | None, go_on: Callable[[], bool],
             start: Callable[[optuna.Trial], Any]) -> None:
    """Asks and starts (`start(trial)`) up to `slots` trials, the `waiting` ones (retries,
    enqueued trials) first, then new ones. The sampler reads the study once for all of them
    (`reads_once`); their new trials and starts are one write (`create_trials`,
    `writes_together`). `drawn()` gives a new trial's parameters drawn ahead (None: the sampler
    draws). Before each trial after the first, `go_on()` is asked (a grid sampler's grid may be
    done); when it says no, the trials made for the rest are handed back to the study. Each
    trial starts before the next is asked (its sampler sees the one before running)."""
    with reads_once(study), writes_together(study):
        made = (create_trials(study, slots - waiting) if slots - waiting > 1 else None) or []
        for i in range(slots):
            if i and not go_on():
                hand_back(study, made[max(0, i - waiting):])
                return
            trial = study.ask() if i < waiting else ask_new(study, made[i - waiting] if made else None)
            fix_params(trial, drawn() if drawn and i >= waiting else None)
            start(trial)


def fence(study: optuna.Study) -> set[int] | None:
    """The storage ids of the study's RUNNING trials, read once for a whole pack (a trial not
    among them was taken over), or None while the storage does not answer (each trial then
    owes its report)."""
    try:
        with no_waiting(storage_of(study)):
            return {trial_id(t) for t in study.get_trials(deepcopy=False, states=(
                optuna.trial.TrialState.RUNNING,))}
    except StorageBusy:
        return None


def write_pack_reports(study: optuna.Study, values: list[tuple[optuna.Trial, int, float]],
                       attrs: list[tuple[optuna.Trial, str, Any]]) -> bool:
    """A pack's epoch at once (`write_reports`), without waiting through an outage: False when
    nothing was written (an outage, a trial taken over meanwhile, a storage without a batched
    path); each trial then reports on its own."""
    try:
        with no_waiting(storage_of(study)):
            return write_reports(study, values, attrs)
    except Exception:  # noqa: BLE001 -- each trial's own report meets it and says it
        return False


def running(trial: optuna.Trial, fenced: set[int] | None) -> bool | None:
    """Whether the fencing read found the trial running (None: no read)."""
    return None if fenced is None else trial_id(trial) in fenced
