"""Population-based training across workers (`--pbt --workers N`, Slurm tasks): one population,
its members spread over the workers, generations synchronous through the storage.

Worker w of N starts the members whose index is w modulo N (a retry, any worker's, goes to
whichever worker asks first). At a generation's epoch e each worker publishes its members:
their state written to `checkpoints/STUDY/pbt/member-I.epoch-E.pt` and as their own checkpoint
(both on disk), then `pbt_ready = e` on their trials. It then waits until every member of the
population is published at e (the barrier; a member that diverged is not waited for) and ranks
the population by the values reported at e, read from the storage -- the same list in every
worker. Each worker exploits its own losers: the donor (drawn with a generator seeded by the
study's seed, e and the loser's index: the same draw wherever it is made) is read from its
published file, or copied on the device when it trains in the same pack, and its values are
explored. A step is idempotent: a member that already has a segment starting at e is not
stepped again, so a retry that resumes at e repeats nothing.

Why synchronous: a generation's ranking then compares every member at the same epoch, as in a
single pack, and a killed worker delays a generation instead of changing it. While it waits,
a worker takes over any member waiting for a retry (a dead worker's), trains it up to e, and
holds the members already at e out of its pack meanwhile (parked: their state kept, their
trials still running and beating).
"""

from __future__ import annotations

import time
from typing import Any

import optuna

from search import optuna_seam
from search.study.lineage import (
    MEMBER_ATTR,
    READY_ATTR,
    START_EPOCH_ATTR,
    generation_ready,
    ranking_at,
    superseded,
)
from search.study.recovery import STOP, Interrupted
from search.worker.loop import State
from search.worker.pbt import PbtLoop

POLL = 0.5  # seconds between the barrier's reads of the storage


class SharedPbtLoop(PbtLoop):
    """PbtLoop for worker `worker` of `workers`: its share of the population, a barrier in the
    storage at each generation, exploits through published states."""

    def __init__(self, *args: Any, worker: int = 0, workers: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.worker, self.workers = worker, workers
        trials = self.study.get_trials(deepcopy=False)
        made = {t.user_attrs[MEMBER_ATTR] for t in trials if MEMBER_ATTR in t.user_attrs}
        self.to_create = [i for i in range(self.pbt.population)
                          if i % workers == worker and i not in made]
        self.n_trials = None  # its share: `to_create`, then whatever retry waits
        self.parked: dict[Any, tuple[Any, dict[str, Any]]] = {}  # member -> (engine key, state)
        self.started: dict[Any, int] = {}  # member -> its segment's pbt_start_epoch
        self.published: set[tuple[int, int]] = set()  # (trial number, epoch)
        self.stepped: set[tuple[int, int]] = set()  # (trial number, epoch)

    # --- members: this worker's share, and any waiting retry ---

    def _ask(self, slots: int = 1) -> bool:  # one at a time: members are numbered
        optuna.storages.fail_stale_trials(self.study)
        trial = self.study.ask() if self.to_create else optuna_seam.ask_waiting(self.study)
        if trial is None:
            return False
        self.asked += 1
        if MEMBER_ATTR in trial.user_attrs:  # a retry
            if self._superseded(trial, superseded(self.study.get_trials(deepcopy=False))):
                return True
        else:
            self._new_member(trial, self.to_create.pop(0))
        self._admit(trial)
        return True

    def _admit(self, trial: optuna.Trial, inherit: dict[str, Any] | None = None) -> Any:
        member = super()._admit(trial, inherit)
        if member is not None:
            self.started[member] = int(trial.user_attrs.get(START_EPOCH_ATTR, 0))
        return member

    def _refill(self) -> None:
        """New and resumed members first wait at a generation's epoch they stand at (a retry
        resumed there takes its step before it trains on)."""
        super()._refill()
        for key, engine in list(self.engines.items()):
            for member in list(engine.members):
                if self._due(member, member.epoch):
                    self._park(key, engine, member)

    # --- a generation ---

    def _between_epochs(self) -> None:
        """Members ahead of this worker's slowest one wait parked at their generation's epoch;
        once all stand at it, they are published, the barrier is awaited, and the step made."""
        held = [(m, m.epoch) for e in self.engines.values() for m in e.members]
        held += [(m, state["epoch"]) for m, (_, state) in self.parked.items()]
        if not held:
            return
        lowest = min(epoch for _, epoch in held)
        for key, engine in list(self.engines.items()):
            for member in list(engine.members):
                if member.epoch > lowest and self._due(member, member.epoch):
                    self._park(key, engine, member)
        if not self._boundary(lowest):
            return
        for member, (_, state) in list(self.parked.items()):
            if state["epoch"] == lowest:
                self._unpark(member)
        group = [(e, m) for e in self.engines.values() for m in e.members if m.epoch == lowest]
        if not any(self._due(m, lowest) for _, m in group):
            return
        self._publish(lowest, group)
        if not self._await(lowest):  # a waiting member was taken over: it trains up to
            for key, engine in list(self.engines.items()):  # `lowest` first, these wait
                for member in list(engine.members):
                    if member.epoch == lowest and self._due(member, lowest):
                        self._park(key, engine, member)
            return
        maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        self._step(lowest, group, ranking_at(self.study.get_trials(deepcopy=False), lowest,
                                             maximize))
        self.stepped |= {(self.in_flight[m].session.trial.number, lowest) for _, m in group
                         if m in self.in_flight}

    def _boundary(self, epoch: int) -> bool:
        return self.pbt.at_boundary(epoch, next(iter(self.in_flight.values())).session.config.epochs)

    def _due(self, member: Any, epoch: int) -> bool:
        """Whether the member has a step to take at `epoch`: a generation's epoch, not where
        its segment began, not stepped here yet."""
        number = self.in_flight[member].session.trial.number
        return (self._boundary(epoch) and self.started.get(member, 0) < epoch
                and (number, epoch) not in self.stepped)

    def _publish(self, epoch: int, group: list[tuple[Any, Any]]) -> None:
        store = self.runner.checkpoints
        for engine, member in group:
            session = self.in_flight[member].session
            if (session.trial.number, epoch) in self.published or not self._due(member, epoch):
                continue
            state = engine.state(member)
            store.save_generation(self.member_index[member], epoch, state)
            session.save(state)  # its own checkpoint at the generation, on disk before ready
            store.settle(session.root, session.trial.number)
            session.trial.set_user_attr(READY_ATTR, epoch)
            self.published.add((session.trial.number, epoch))

    def _await(self, epoch: int) -> bool:
        """Until every member stands published at `epoch` (read twice in a row: a dead
        worker's member is briefly failed before its retry waits); False when a waiting
        member was taken over instead (this worker trains it up to `epoch` first)."""
        confirmed = 0
        while True:
            if STOP.requested:
                raise Interrupted
            ready = generation_ready(self.study.get_trials(deepcopy=False),
                                     self.pbt.population, epoch)
            confirmed = confirmed + 1 if ready else 0
            if confirmed >= 2:
                return True
            if not ready:  # a dead worker's members: re-queued (by `_ask` too), taken over
                if self.runner.reaper is not None:
                    self.runner.reaper(self.study)
                if len(self.in_flight) < self.pack:
                    if self._ask():
                        return False
                else:
                    optuna.storages.fail_stale_trials(self.study)
            time.sleep(POLL)

    def _step(self, epoch: int, group: list[tuple[Any, Any]], ranking: list[int]) -> None:
        super()._step(epoch, group, ranking)
        for _, member in group:  # every step that could read them is over
            self.runner.checkpoints.remove_generations(self.member_index[member],
                                                       epoch - self.pbt.interval + 1)

    # --- parking: a member at its generation's epoch waits out of the pack ---

    def _park(self, key: Any, engine: Any, member: Any) -> None:
        self.parked[member] = (key, engine.state(member))
        engine.remove(member)

    def _unpark(self, member: Any) -> None:
        key, state = self.parked.pop(member)
        flight = self.in_flight.pop(member)
        back = self._engine(key, flight.session.config).add(flight.session.config, state)
        self.in_flight[back] = flight
        self.member_index[back] = self.member_index.pop(member)
        self.started[back] = self.started.pop(member, 0)

    def _close_all(self, exc: BaseException) -> None:
        for member in list(self.parked):
            self._unpark(member)
        super()._close_all(exc)

    def _tell(self, engine: Any, member: Any, state: State,
              values: list[float] | None = None) -> None:
        if state == State.COMPLETE:  # its published states are read by no step any more
            self.runner.checkpoints.remove_generations(self.member_index[member], 1 << 30)
        super()._tell(engine, member, state, values)

