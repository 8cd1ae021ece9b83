"""A PBT member's lineage: the segments (Optuna trials) that led to a trial, through each
segment's `pbt_parent` (the trial it copied) and `pbt_start_epoch` (where it began), read as a
schedule of hyperparameters per epoch range."""

from __future__ import annotations

from typing import Any

import optuna

# a PBT member's trial attributes (Optuna user attributes), by name
MEMBER_ATTR = "pbt_member"  # the member (population slot) a trial is a segment of
START_EPOCH_ATTR = "pbt_start_epoch"  # the epoch the segment starts at
DONOR_ATTR = "pbt_parent"  # the trial whose state the segment starts from (an exploit)
GENERATION_ATTR = "pbt_generation"  # a shared population's generation
SCHEDULE_ATTR = "pbt_schedule"  # the member's settings by epoch, on its last segment
READY_ATTR = "pbt_ready"  # a shared population's member published its state for the generation
REPLACES_ATTR, REPLACED_BY_ATTR = "pbt_replaces", "pbt_replaced_by"  # an exploit's two ends

PBT_ATTRS = (MEMBER_ATTR, DONOR_ATTR, START_EPOCH_ATTR, GENERATION_ATTR)


def is_pbt(trials: list[optuna.trial.FrozenTrial]) -> bool:
    return any(MEMBER_ATTR in t.user_attrs for t in trials)


def last_epoch(trial: optuna.trial.FrozenTrial) -> int:
    steps = list(trial.intermediate_values)
    return max(steps) if steps else int(trial.user_attrs.get(START_EPOCH_ATTR, 0))


def segments(trials: list[optuna.trial.FrozenTrial], number: int) -> list[dict[str, Any]]:
    """The schedule that trained trial `number`, oldest first: one entry per segment, {trial,
    first, last (epochs, inclusive), params}."""
    by_number = {t.number: t for t in trials}
    out: list[dict[str, Any]] = []
    trial, end = by_number.get(number), None
    while trial is not None and len(out) < len(by_number):
        start = int(trial.user_attrs.get(START_EPOCH_ATTR, 0))
        last = last_epoch(trial) if end is None else end
        out.append({"trial": trial.number, "first": start + 1, "last": last,
                    "params": dict(trial.params)})
        parent, end = trial.user_attrs.get(DONOR_ATTR), start
        trial = by_number.get(parent) if parent is not None else None
    return out[::-1]


def schedule_text(schedule: list[dict[str, Any]], short) -> str:
    """`epochs 1-4: lr 3.1e-3, weight_decay 1e-4 (trial 2); epochs 5-8: ...`; `short` formats a
    value as the trial lines do."""
    return "; ".join(
        f"epochs {s['first']}-{s['last']}: "
        + ", ".join(f"{k} {short(v)}" for k, v in s["params"].items())
        + f" (trial {s['trial']})" for s in schedule)


def superseded(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """Waiting PBT trials a newer segment of the same member replaces: {waiting trial: newer}.
    A worker killed in the middle of an exploit leaves the replaced segment and its replacement
    both to be retried; only the newer one (the later `pbt_start_epoch`) may go on."""
    State = optuna.trial.TrialState
    live = [t for t in trials if MEMBER_ATTR in t.user_attrs
            and t.state in (State.WAITING, State.RUNNING)]
    out = {}
    for t in live:
        if t.state != State.WAITING:
            continue
        newer = [u for u in live if u.user_attrs[MEMBER_ATTR] == t.user_attrs[MEMBER_ATTR]
                 and u.user_attrs.get(START_EPOCH_ATTR, 0) > t.user_attrs.get(START_EPOCH_ATTR, 0)]
        if newer:
            out[t.number] = newer[0].number
    return out


# --- a population shared by several workers: its generations, read from the storage ---

def current_segments(trials: list[optuna.trial.FrozenTrial]) -> dict[int, optuna.trial.FrozenTrial]:
    """Each member's current segment: its live trial (running, waiting for a retry, or
    complete) with the latest start epoch. A member whose segments all ended otherwise (it
    diverged, or is between its death and its retry) has none."""
    State = optuna.trial.TrialState
    out: dict[int, optuna.trial.FrozenTrial] = {}

    def order(t: optuna.trial.FrozenTrial) -> tuple[int, int]:
        return int(t.user_attrs.get(START_EPOCH_ATTR, 0)), t.number

    for t in trials:
        if MEMBER_ATTR in t.user_attrs and t.state in (State.RUNNING, State.WAITING, State.COMPLETE):
            member = int(t.user_attrs[MEMBER_ATTR])
            if member not in out or order(t) > order(out[member]):
                out[member] = t
    return out


def generation_ready(trials: list[optuna.trial.FrozenTrial], population: int, epoch: int) -> bool:
    """Whether every member of the population stands at `epoch` with its state published
    (`pbt_ready`), or has no current segment (diverged: refilled at the step)."""
    created = {int(t.user_attrs[MEMBER_ATTR]) for t in trials if MEMBER_ATTR in t.user_attrs}
    if len(created) < population:  # a worker has not started its members yet
        return False
    return all(int(t.user_attrs.get(READY_ATTR, -1)) >= epoch
               or int(t.user_attrs.get(START_EPOCH_ATTR, 0)) >= epoch
               for t in current_segments(trials).values())


def segment_at(trials: list[optuna.trial.FrozenTrial], member: int, epoch: int
               ) -> optuna.trial.FrozenTrial | None:
    """The member's segment that reported `epoch` (any attempt of it: a retry recomputes the
    same values), newest first."""
    found = [t for t in trials if t.user_attrs.get(MEMBER_ATTR) == member
             and epoch in t.intermediate_values]
    return max(found, key=lambda t: t.number) if found else None


def ranking_at(trials: list[optuna.trial.FrozenTrial], epoch: int, maximize: bool) -> list[int]:
    """The live members, best first by the value each reported at `epoch` (ties: the lower
    member first): the same list in every worker that reads the same storage."""
    scored = []
    for member in current_segments(trials):
        seg = segment_at(trials, member, epoch)
        if seg is not None:
            value = seg.intermediate_values[epoch]
            scored.append((-value if maximize else value, member))
    return [member for _, member in sorted(scored)]


def replaced_at(trials: list[optuna.trial.FrozenTrial], member: int, epoch: int) -> bool:
    """Whether the member already has a segment that starts at `epoch` (its step there is done)."""
    return any(t.user_attrs.get(MEMBER_ATTR) == member
               and int(t.user_attrs.get(START_EPOCH_ATTR, 0)) == epoch
               and t.user_attrs.get(DONOR_ATTR) is not None for t in trials)
