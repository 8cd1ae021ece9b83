"""Population-based training (`--pbt`): the one PBT loop. On one worker the population trains
together as one stacked model; every `interval` epochs the worst quantile of it copies the best
quantile (exploit: the donor whole -- weights, optimiser and generator state, epoch, and its
settings, batch size, augmentation and optimiser included -- copied on the device, no file
round trip; the member goes on in the pack of its donor's shape) and perturbs the donor's
per-trial settings, resampling its searched batch size or augmentation now and then (explore:
`search.inputs.pbt.explore`). Only a member of another network or number of local workers
cannot be copied (said at the start and at the step). `PbtLoop._step` is the one exploit step; a population shared by
workers (`pbt_shared.SharedPbtLoop`) adds only where its ranking and its remote donors' states
come from (the storage and published files) and the barrier between them.

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
from search.inputs.pbt import Pbt, explore, kept
from search.logs import say
from search.study.lineage import (
    DONOR_ATTR,
    GENERATION_ATTR,
    MEMBER_ATTR,
    REPLACED_BY_ATTR,
    REPLACES_ATTR,
    SCHEDULE_ATTR,
    START_EPOCH_ATTR,
    replaced_at,
    segment_at,
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
        self.seed = seed
        self.member_index: dict[Any, int] = {}
        self.vacant: list[tuple[int, int]] = []  # (member, its failed trial)

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
            if len(group) >= 2 and self.pbt.at_boundary(epoch, group[0][1].config.epochs):
                ranked = sorted(group, key=lambda em: self._score(em[1]), reverse=True)
                self._step(epoch, group, [self.member_index[m] for _, m in ranked])

    def _score(self, member: Any) -> float:
        session = self.in_flight[member].session
        value = session.values(member.history)[0]
        return value if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -value

    def _step(self, epoch: int, group: list[tuple[Any, Any]], ranking: list[int]) -> None:
        """One generation, the population's members ranked best first at `epoch`: each of
        this worker's members in the bottom quantile, and each member vacant since the last
        step (diverged), copies a member of the top quantile -- one of its own network and
        local workers (`inputs.pbt.kept`), of any batch size, augmentation or optimiser: it
        goes on in the pack of its donor's shape --, drawn with
        a generator seeded by the study's seed, the epoch and the member (the same draw
        wherever it is made), then explores. A member that already has a segment starting at
        `epoch` is not stepped again, so a retry resumed there repeats nothing."""
        trials = self.study.get_trials(deepcopy=False)
        top, losers = self.pbt.split(ranking)
        mine = {self.member_index[m]: (e, m) for e, m in group}
        vacant = dict(self.vacant)
        for index in sorted((set(losers) & set(mine)) | set(vacant)):
            if replaced_at(trials, index, epoch):
                continue  # stepped already (by this member's earlier attempt)
            engine, loser = mine.get(index, (None, None))
            replaces = (self.in_flight[loser].session.trial.number if loser is not None
                        else vacant[index])
            own = kept(next(t for t in trials if t.number == replaces).params)
            rng = random.Random(f"{self.seed}:{epoch}:{index}")
            donors = [j for j in top if kept(self._segment(trials, j, epoch).params) == own]
            if not donors:
                say(f"PBT: member {index} (trial {replaces}) trains on at epoch {epoch}: no "
                    f"member of the top quantile has its {', '.join(own)}")
                continue
            donor = self._segment(trials, rng.choice(donors), epoch)
            state = self._donor_state(int(donor.user_attrs[MEMBER_ATTR]), epoch)
            if state is None:
                continue
            number = self._start_segment(state, donor, epoch, index, replaces, rng)
            if loser is not None:
                self._replaced(engine, loser, donor.number, number, epoch)
            else:
                self.vacant = [v for v in self.vacant if v[0] != index]

    def _here(self, index: int, epoch: int) -> tuple[Any, Any] | None:
        """(engine, member) of member `index` when it trains in this worker at `epoch`."""
        for engine in self.engines.values():
            for member in engine.members:
                if self.member_index.get(member) == index and member.epoch == epoch:
                    return engine, member
        return None

    def _segment(self, trials: list[optuna.trial.FrozenTrial], index: int,
                 epoch: int) -> optuna.trial.FrozenTrial:
        """Member `index`'s segment at `epoch`: its trial here when it trains here (its reports
        may still be on their way to the storage), else the one that reported `epoch`."""
        here = self._here(index, epoch)
        if here is not None:
            return optuna_seam.get_trial(self.study, self.in_flight[here[1]].session.trial)
        return segment_at(trials, index, epoch)

    def _donor_state(self, index: int, epoch: int) -> dict[str, Any] | None:
        """The donor's state at `epoch`: copied on the device when it trains here (it trains
        on unchanged), else read from its published file (a population shared by workers)."""
        here = self._here(index, epoch)
        if here is not None:
            return here[0].state(here[1])
        return self.runner.checkpoints.load_generation(index, epoch)

    def _fail(self, engine: Any, member: Any, reason: str) -> None:
        index, number = self.member_index.get(member), self.in_flight[member].session.trial.number
        super()._fail(engine, member, reason)
        if index is not None:  # refilled at the next step from a donor
            self.vacant.append((index, number))

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
