"""Population-based training in one pack (`--pbt`): the population trains together as one
stacked model; every `interval` epochs the worst quantile of it copies the best quantile (exploit:
the donor's weights, optimiser and generator state, copied on the device, no file round trip)
and perturbs the donor's per-trial settings (explore: `search.inputs.pbt.explore`).

Each stretch of a member with constant settings is one Optuna trial, so every tool shows the
population as it evolved: a replaced segment ends PRUNED with `pruned_reason` "replaced by a copy
of trial 17 at epoch 6 (continues as trial 23)"; the new segment carries `pbt_member`,
`pbt_parent` (the trial it copied), `pbt_start_epoch` and `pbt_generation`, and its own MLflow
run (nested under the study's, the same tags) logs from the next epoch on. Generations are
synchronous: members step together, so every member of a generation is ranked at the same
epoch. A segment's checkpoint is queued as it starts, so a killed worker's members resume from
their checkpoints like any trial.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import Any

import optuna

from search import defaults, optuna_seam
from search.inputs.pbt import Pbt, explore
from search.study.lineage import (
    DONOR_ATTR,
    GENERATION_ATTR,
    MEMBER_ATTR,
    REPLACED_BY_ATTR,
    REPLACES_ATTR,
    SCHEDULE_ATTR,
    START_EPOCH_ATTR,
    segments,
    superseded,
)
from search.study.recovery import RetryDeadTrial
from search.study.session import TrialRunner
from search.worker.loop import State, WorkerLoop


class PbtLoop(WorkerLoop):
    """The worker loop with a population: `population` members asked (or resumed), then an
    exploit/explore step whenever the members stand at a multiple of `interval` epochs."""

    def __init__(self, study: optuna.Study, runner: TrialRunner, pbt: Pbt,
                 timeout: float | None, handler: RetryDeadTrial, stop_within: float = defaults.STOP_WITHIN,
                 seed: int | None = None):
        trials = study.get_trials(deepcopy=False)
        members = {t.user_attrs[MEMBER_ATTR] for t in trials if MEMBER_ATTR in t.user_attrs}
        gone = superseded(trials)
        waiting = sum(t.state == State.WAITING and MEMBER_ATTR in t.user_attrs
                      and t.number not in gone for t in trials)
        # a rerun resumes the members that were stopped (their retries wait) and starts only
        # the members the population still lacks
        n_trials = max(0, pbt.population - len(members)) + waiting
        super().__init__(study, runner, pbt.population, n_trials, timeout, handler,
                         stop_within, ramp=None)
        self.pbt = pbt
        self.next_member = max(members, default=-1) + 1
        self.seed, self.rng = seed, random.Random(seed)
        self.member_index: dict[Any, int] = {}
        self.vacant: list[tuple[int, tuple, int]] = []  # (member, shape key, failed trial)

    def _ask(self, slots: int = 1) -> bool:  # one at a time: members are numbered
        optuna.storages.fail_stale_trials(self.study)
        replaced = superseded(self.study.get_trials(deepcopy=False))
        trial = self.study.ask()
        if self._superseded(trial, replaced):
            return True  # it was not a member of this command's share
        self.asked += 1
        self._asked(trial)
        self._admit(trial)
        return True

    def _superseded(self, trial: optuna.Trial, replaced: dict[int, int]) -> bool:
        """A retry a newer segment of its member replaces (a kill mid-exploit left both):
        ended PRUNED, the newer goes on."""
        newer = replaced.get(trial.number)
        if newer is None:
            return False
        trial.set_user_attr("pruned_reason", f"superseded by trial {newer} (a worker died "
                            "while this member was being replaced)")
        self.study.tell(trial, state=State.PRUNED)
        return True

    def _asked(self, trial: optuna.Trial) -> None:
        if MEMBER_ATTR not in trial.user_attrs:  # a new member (a retry keeps its attributes)
            self._new_member(trial, self.next_member)
            self.next_member += 1

    @staticmethod
    def _new_member(trial: optuna.Trial, index: int) -> None:
        """A new member's first segment: the member attributes every segment carries."""
        for key, value in ((MEMBER_ATTR, index), (START_EPOCH_ATTR, 0), (GENERATION_ATTR, 0)):
            trial.set_user_attr(key, value)

    def _admit(self, trial: optuna.Trial, inherit: dict[str, Any] | None = None) -> Any:
        member = super()._admit(trial, inherit)
        if member is not None:
            attrs = trial.user_attrs
            self.member_index[member] = int(attrs[MEMBER_ATTR])
            session = self.in_flight[member].session
            for key in (MEMBER_ATTR, DONOR_ATTR, START_EPOCH_ATTR, GENERATION_ATTR):
                if key in attrs:
                    self.runner.tracker.tag(session.run_id, key, str(attrs[key]))
        return member

    def _between_epochs(self) -> None:
        by_epoch: dict[int, list[tuple[Any, Any]]] = defaultdict(list)
        for engine in self.engines.values():
            for member in engine.members:
                by_epoch[member.epoch].append((engine, member))
        for epoch, group in sorted(by_epoch.items()):
            if self.pbt.at_boundary(epoch, group[0][1].config.epochs):
                self._step(epoch, group)

    def _score(self, member: Any) -> float:
        session = self.in_flight[member].session
        value = session.values(member.history)[0]
        return value if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -value

    def _step(self, epoch: int, group: list[tuple[Any, Any]]) -> None:
        """One generation: the worst `quantile` copy a random member of the best `quantile`
        that shares their shape (same pack), then explore; a member that failed since the last
        step (diverged) is refilled the same way, so the population keeps its size."""
        if len(group) < 2:
            return
        top, bottom = self.pbt.split(sorted(group, key=lambda em: self._score(em[1]), reverse=True))
        for engine, loser in bottom:
            donors = [d for e, d in top if e is engine]
            if donors:
                self._exploit(engine, loser, self.rng.choice(donors), epoch)
        for index, key, number in list(self.vacant):
            donors = [(e, d) for e, d in top if e.key == key]
            if donors:
                self.vacant.remove((index, key, number))
                engine, donor = self.rng.choice(donors)
                self._copy(engine, donor, epoch, index, number)

    def _fail(self, engine: Any, member: Any, reason: str) -> None:
        index, number = self.member_index.get(member), self.in_flight[member].session.trial.number
        super()._fail(engine, member, reason)
        if index is not None:  # refilled at the next step from a donor
            self.vacant.append((index, engine.key, number))

    def _copy(self, engine: Any, donor: Any, epoch: int, index: int, replaces: int) -> int:
        """A new segment of member `index`: the donor's state at `epoch`, its values explored."""
        donor_trial = self.in_flight[donor].session.trial
        frozen = optuna_seam.get_trial(self.study, donor_trial)
        state = engine.state(donor)  # copied on the device: the donor trains on unchanged
        return self._start_segment(state, frozen, epoch, index, replaces, self.rng)

    def _start_segment(self, state: dict[str, Any], donor: optuna.trial.FrozenTrial, epoch: int,
                       index: int, replaces: int, rng: random.Random) -> int:
        """Member `index` goes on as a new trial from `state` (the donor's at `epoch`) with the
        donor's values explored; returns its number."""
        params = explore(donor.params, donor.distributions, self.pbt.mutate,
                         self.pbt.resample_probability, rng)
        attrs = {MEMBER_ATTR: index, DONOR_ATTR: donor.number,
                 START_EPOCH_ATTR: epoch, GENERATION_ATTR: epoch // self.pbt.interval,
                 REPLACES_ATTR: replaces}
        trial = optuna_seam.start_trial(self.study, params, donor.distributions, attrs)
        member = self._admit(trial, inherit=state)
        if member is not None:  # its first checkpoint now: a crash resumes it from the copy
            self.in_flight[member].session.save(state)
        return trial.number

    def _exploit(self, engine: Any, loser: Any, donor: Any, epoch: int) -> None:
        loser_session = self.in_flight[loser].session
        number = self._copy(engine, donor, epoch, self.member_index[loser],
                            loser_session.trial.number)
        self._replaced(engine, loser, self.in_flight[donor].session.trial.number, number, epoch)

    def _replaced(self, engine: Any, loser: Any, donor_number: int, number: int,
                  epoch: int) -> None:
        """The loser's segment ends PRUNED: replaced by trial `number`, a copy of the donor."""
        loser_session = self.in_flight[loser].session
        with self._ending(loser_session):
            loser_session.trial.set_user_attr(REPLACED_BY_ATTR, number)
            loser_session.pruned(f"replaced by a copy of trial {donor_number} at epoch {epoch} "
                                 f"(continues as trial {number})", epoch, word="replaced")
            self._tell(engine, loser, State.PRUNED)

    def _tell(self, engine: Any, member: Any, state: State,
              values: list[float] | None = None) -> None:
        if state == State.COMPLETE:
            self._record_schedule(self.in_flight[member].session)
        super()._tell(engine, member, state, values)

    def _record_schedule(self, session: Any) -> None:
        """A finished member's schedule (its lineage's settings per epoch range) on its trial
        (`pbt_schedule`) and its MLflow run (tag `pbt_schedule`), before its trial ends."""
        schedule = segments(self.study.get_trials(deepcopy=False), session.trial.number)
        session.trial.set_user_attr(SCHEDULE_ATTR, schedule)
        self.runner.tracker.tag(session.run_id, SCHEDULE_ATTR, json.dumps(schedule))
