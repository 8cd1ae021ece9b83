"""The worker loop: up to P trials in flight, trained as stacked models (`--pack P`; P = 1 is
a plain run, the same loop).

Trials are asked from Optuna (ask/tell), so any sampler works. A trial's shape settings
(`trainer.config.pack_key`: batch size, optimiser, augmentation, dataset, epochs, local-method
settings, precision, ...) choose its pack; continuous settings (lr, betas, weight decay, T_max,
warm-up, seed, ...) differ freely inside one. The worker holds one engine per shape key, all
its in-flight trials together never more than P (fewer while the study has heard from few:
`--ramp`, `search.worker.sizing.in_flight_limit`), and runs one epoch of each engine in turn.
Between epochs every trial is reported, pruned, failed or completed on its own
(TrialSession), and the freed slots are refilled with newly asked trials while the budget
lasts. Each trial checkpoints in one format, so a retry resumes in any pack.

Faults: a trial whose attempt was taken over while this worker was paused is dropped quietly
(one line, nothing written) and its slot refilled, so the worker's share still runs; a storage
silent past `--storage-patience` stops the worker like SIGTERM but without storage writes (the
trials stay RUNNING there and are retried from their checkpoints once it is back); a pack that
runs out of device memory is re-queued to resume from its checkpoints and the worker's pack
halved (a trial too big alone fails, the worker goes on).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import optuna

from search import defaults, optuna_seam
from search.errors import AttemptLost, StorageUnavailable
from search.inputs.algorithms import RoundPruner
from search.logs import say
from search.study.budget import ask_lock, room_left
from search.study.recovery import STOP, Interrupted, RetryDeadTrial, requeue_interrupted
from search.study.session import TrialRunner, TrialSession
from search.worker.sizing import in_flight_limit
from trainer.config import pack_key
from trainer.errors import ConfigError

State = optuna.trial.TrialState


class InFlight:
    """A trial in flight: its session and its Optuna heartbeat (database storages)."""

    def __init__(self, session: TrialSession, heartbeat: Any):
        self.session, self.heartbeat = session, heartbeat

    def end(self) -> None:
        self.heartbeat.join()


def stop_rule(stop_within: float):
    """A signalled worker stops at the next optimiser step (a mid-epoch checkpoint), unless the
    epoch's end is near: it finishes the epoch when the steps left take under half of
    `stop_within` at the pace so far, so a scheduler's grace (Slurm's KillWait, Kubernetes'
    30 s) is never spent on an epoch that cannot end in time."""

    def rule(steps_run: int, steps_left: int, seconds: float) -> bool:
        return STOP.requested and seconds / max(1, steps_run) * steps_left > stop_within / 2

    return rule


class WorkerLoop:
    """One worker's trials in flight: `run()` asks, trains an epoch of every engine, reports,
    and refills, until its share is run; every way out (a stop, a lost storage, an error) goes
    through `_close_all`."""

    def __init__(self, study: optuna.Study, runner: TrialRunner, pack: int,
                 n_trials: int | None, timeout: float | None, handler: RetryDeadTrial,
                 stop_within: float = defaults.STOP_WITHIN, ramp: int | None = None,
                 study_total: int | None = None, ahead: Any = None):
        self.study, self.runner, self.handler = study, runner, handler
        self.ahead = ahead  # search.worker.ahead.SampleAhead (--sample-ahead), or None
        self.study_total = study_total  # the study's --n-trials, across commands and machines
        self.pack, self.ramp, self.n_trials, self.timeout = pack, ramp, n_trials, timeout
        self.rule = stop_rule(stop_within)
        self.engines: dict[tuple, Any] = {}  # shape key -> trainer.engine.Engine
        self.said_unbatched: set[str] = set()  # networks whose rows cannot run batched here
        self.in_flight: dict[Any, InFlight] = {}  # engine member -> its trial
        self.asked, self.start = 0, time.monotonic()

    # --- the loop ---

    def run(self) -> None:
        """Runs this worker's share (`n_trials` trials, or until `timeout`), `pack` at a time
        (with a ramp, fewer until the study has heard from as many: `in_flight_limit`)."""
        with optuna_seam.optimize_loop(self.study):
            try:
                # stale trials (a dead worker's, on a heartbeat storage) re-queued first: they
                # count toward the study's total until then
                optuna.storages.fail_stale_trials(self.study)
                while True:
                    self._refill()
                    if not self.in_flight:
                        return
                    for key, engine in list(self.engines.items()):
                        self._train_epoch(key, engine)
                    self._between_epochs()
                    if STOP.requested:  # a safe point: every trial in flight reported and saved
                        raise Interrupted
            except BaseException as exc:
                self._close_all(exc)
                if isinstance(exc, Interrupted | KeyboardInterrupt):
                    raise KeyboardInterrupt from None
                raise

    def _between_epochs(self) -> None:
        """A hook run once every engine trained an epoch and its trials reported (PBT's
        exploit and explore)."""

    def _budget_left(self) -> bool:
        return ((self.n_trials is None or self.asked < self.n_trials)
                and not optuna_seam.stop_requested(self.study)
                and (self.timeout is None or time.monotonic() - self.start < self.timeout)
                and not STOP.requested)

    def _refill(self) -> None:
        """Asks new trials into free slots while the budget lasts (one storage read for the
        ramp, and only when a slot is free)."""
        pack = self.pack
        width = (in_flight_limit(self.study, pack, self.ramp, len(self.in_flight))
                 if len(self.in_flight) < pack else pack)
        asked = self.asked
        while len(self.in_flight) < width and self._budget_left():
            if not self._ask(width - len(self.in_flight)):
                break
        if self.ahead is not None and self.asked > asked:  # the next refill's, drawn meanwhile
            self.ahead.request(self.asked - asked, self.n_trials and self.n_trials - self.asked)

    def _ask(self, slots: int = 1) -> bool:
        """Asks up to `slots` trials and starts each; False when the study holds its total
        already. The count and the asks are one step for every worker on this machine
        (`ask_lock`), so the workers of a command never overshoot the total. The stale-trial
        check, the count, the look for waiting trials (retries, enqueued trials) and the
        sampler's read of the study are one storage read each for all of them, not for each."""
        optuna.storages.fail_stale_trials(self.study)
        if self.n_trials is not None:
            slots = min(slots, self.n_trials - self.asked)
        with ask_lock(self.study.study_name, self.study_total is not None):
            trials = self.study.get_trials(deepcopy=False)
            slots = int(min(slots, room_left(trials, self.study_total)))
            waiting = sum(t.state == State.WAITING for t in trials)
            drawn = self.ahead.next if self.ahead else None  # parameters drawn while the pack trained
            optuna_seam.ask_pack(self.study, slots, waiting, drawn, self._budget_left, self._start)
        return slots > 0

    def _start(self, trial: optuna.Trial) -> None:
        self.asked += 1
        self._asked(trial)
        self._admit(trial)

    def _asked(self, trial: optuna.Trial) -> None:
        """A hook for loops that mark their trials before they start (PBT's members)."""

    def _admit(self, trial: optuna.Trial, inherit: dict[str, Any] | None = None) -> Any:
        """Starts an asked (or created) trial in the engine of its shape: from its chain's
        checkpoint, or from `inherit` (a state another trial left: PBT's exploit). Returns the
        engine's member, or None when its configuration is impossible (the trial fails)."""
        # beating from the ask on: a worker killed while it opens the trial's MLflow run
        # leaves a trial that goes stale, not one RUNNING for ever
        heartbeat = optuna_seam.heartbeat_thread(trial, self.study)
        heartbeat.start()
        try:
            session = self.runner.begin(trial)
        except ConfigError:
            heartbeat.join()
            self.study.tell(trial, state=State.FAIL)
            return None
        except BaseException:
            heartbeat.join()
            raise
        resume = session.resume if inherit is None else inherit
        key = pack_key(session.config)
        if resume is not None and "partial" in resume:
            key = (key, "inside an epoch", trial.number)  # alone until it ends
        member = self._engine(key, session.config).add(session.config, resume)
        self.in_flight[member] = InFlight(session, heartbeat)
        return member

    def _engine(self, key: Any, config: Any) -> Any:
        """The engine that trains trials of shape `key` (made for the first of them): the one
        place an engine is set up, for a new trial, a resumed one or a PBT member."""
        from trainer.engine import Engine
        from trainer.runtime import prepare_sharing

        if key not in self.engines:
            setups = [e.setup for e in self.engines.values()]
            engine = self.engines[key] = Engine(prepare_sharing(config, setups))
            if engine.unbatched is not None and config.model not in self.said_unbatched:
                self.said_unbatched.add(config.model)  # once: its dry step ran on this device
                say(f"model {config.model}: its rows run one after another on "
                    f"{engine.setup.device}, not batched ({engine.unbatched})")
        return self.engines[key]

    def _train_epoch(self, key: tuple, engine: Any) -> None:
        """One epoch of one engine's trials, then each trial's report and end or checkpoint."""
        import torch

        if not engine.members:
            del self.engines[key]
            return
        try:
            results = engine.run_epoch(self.rule)
        except torch.OutOfMemoryError as exc:
            del self.engines[key]
            if self.pack == 1:  # alone and still too big: this trial fails, the worker goes on
                self._fail_all(engine, f"out of device memory alone: {str(exc).splitlines()[0]}")
            else:
                self._narrow(engine, max(1, min(self.pack, len(self.in_flight)) // 2))
            return
        if not results:  # stopped inside the epoch: save where it stands, then stop
            for member in engine.members:
                session = self.in_flight[member].session
                if session.owned():
                    session.save(engine.state(member))
            raise Interrupted
        running = self._running_ids()
        self._new_round()
        self._write_reports(results, running)
        for member, metrics, error in results:
            self._after_epoch(engine, member, metrics, error, running)

    def _write_reports(self, results: list, running: set[int] | None) -> None:
        """The epoch's reports of the trials the fencing read found running, written at once
        (one transaction or append instead of one per trial: `optuna_seam.write_pack_reports`).
        A trial left out -- or all, when the write fails (an outage, a trial taken over
        meanwhile) -- reports on its own in `on_epoch`, as it always did."""
        if running is None:
            return
        writes = []
        for member, metrics, error in results:
            session = self.in_flight[member].session
            if error is None and optuna_seam.running(session.trial, running):
                mine = session.prewrite(metrics)
                if mine is not None:
                    writes.append((session, mine))
        if not writes:
            return
        done = optuna_seam.write_pack_reports(self.study, [v for _, w in writes for v in w[0]],
                                              [a for _, w in writes for a in w[1]])
        if done:
            for session, mine in writes:
                session.prewritten(mine)

    def _running_ids(self) -> set[int] | None:
        """The fencing read for the whole pack, once an epoch: the study's RUNNING trials (None
        while the storage does not answer: each trial then owes its report)."""
        return optuna_seam.fence(self.study)

    def _after_epoch(self, engine: Any, member: Any, metrics: dict | None,
                     error: Exception | None, running: set[int] | None = None) -> None:
        session = self.in_flight[member].session
        known = optuna_seam.running(session.trial, running)
        if error is not None:
            self._fail(engine, member, str(error))
            return
        last = member.epoch >= member.config.epochs
        try:
            session.on_epoch(metrics, last=last, running=known)
        except AttemptLost as exc:
            self._drop(engine, member, str(exc))
            return
        except optuna.TrialPruned as exc:
            with self._ending(session):
                session.pruned(str(exc), member.epoch)
                self._tell(engine, member, State.PRUNED)
            return
        if last:
            values = session.values(member.history)
            with self._ending(session):
                session.completed(values, member.epoch, member.history)
                self._tell(engine, member, State.COMPLETE, values)
        else:
            session.checkpoint(member.epoch, lambda: engine.state(member), len(self.in_flight))

    def _new_round(self) -> None:
        """The pruner reads the study's complete trials afresh at its next call."""
        if isinstance(self.study.pruner, RoundPruner):
            self.study.pruner.new_round()

    # --- a trial's ends ---

    @contextlib.contextmanager
    def _ending(self, session: Any) -> Iterator[None]:
        """A trial's end (its last attributes, its state and values) written at once
        (`one_write`); an attempt taken over since its last check writes none of it."""
        try:
            with optuna_seam.one_write(session.trial):
                yield
        except optuna.exceptions.UpdateFinishedTrialError:
            say(session.lost_line())

    def _release(self, engine: Any, member: Any) -> InFlight:
        flight = self.in_flight.pop(member)
        engine.remove(member)
        flight.end()
        return flight

    def _tell(self, engine: Any, member: Any, state: State,
              values: list[float] | None = None) -> None:
        flight = self._release(engine, member)
        try:
            optuna_seam.tell(self.study, flight.session.trial,
                             values if state == State.COMPLETE else None, state)
        except optuna.exceptions.UpdateFinishedTrialError:  # taken over since its last check
            say(flight.session.lost_line())
        if state == State.COMPLETE:
            self._new_round()  # the pruner counts it from the next report on

    def _drop(self, engine: Any, member: Any, line: str) -> None:
        """A lost attempt: no tell, no MLflow, no checkpoint; its share is asked again."""
        say(line)
        self._release(engine, member).session.lost()
        self.asked -= 1

    def _fail(self, engine: Any, member: Any, reason: str) -> None:
        session = self.in_flight[member].session
        if session.failed(reason):
            self._tell(engine, member, State.FAIL)
        else:
            self._drop(engine, member, session.lost_line())

    def _fail_all(self, engine: Any, reason: str) -> None:
        for member in list(engine.members):
            self._fail(engine, member, reason)

    def _requeue(self, engine: Any, member: Any, reason: str) -> bool:
        """Stopped or out of memory: failed and re-queued to resume from its checkpoint; False
        (dropped, nothing written) when the attempt was lost meanwhile."""
        session = self.in_flight[member].session
        number = session.trial.number
        if not session.interrupted(reason):
            self._drop(engine, member, session.lost_line())
            return False
        self._tell(engine, member, State.FAIL)
        requeue_interrupted(self.study, number, self.handler)
        return True

    def _narrow(self, engine: Any, new_pack: int) -> None:
        """Out of device memory: every trial of the pack goes back to the queue to resume from
        its last checkpoint (this epoch's steps are lost), the worker packs `new_pack` on."""
        import torch

        numbers, in_flight = [], len(self.in_flight)
        for member in list(engine.members):
            number = self.in_flight[member].session.trial.number
            if self._requeue(engine, member, f"out of device memory in a pack of {in_flight} "
                             f"in epoch {member.epoch + 1}; resumes from its checkpoint"):
                numbers.append(number)
                self.asked -= 1  # its retry is this worker's to run again, not a new trial
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.pack = new_pack
        say(f"out of device memory with {in_flight} trials in flight: this worker packs at most "
            f"{new_pack} from now on; trial(s) {', '.join(map(str, numbers))} resume from their "
            "checkpoints")

    def _close_all(self, exc: BaseException) -> None:
        """The one way out with trials in flight. A stop re-queues each to resume where it
        stands; a lost storage writes nothing to it (its runs closed KILLED, its trials found
        stale and retried once it is back); any other error fails them, where it still can."""
        for engine in self.engines.values():
            for member in list(engine.members):
                session = self.in_flight[member].session
                if isinstance(exc, Interrupted | KeyboardInterrupt):
                    if member.partial is None and session.unsaved(member.epoch) and session.owned():
                        session.save(engine.state(member))  # the epochs since the cadence's last
                    where = (f"interrupted in epoch {member.epoch + 1} after step "
                             f"{member.partial['at_step']}" if member.partial is not None
                             else f"interrupted after epoch {member.epoch}")
                    self._requeue(engine, member, f"{where}; resumes from there")
                    continue
                if isinstance(exc, StorageUnavailable):
                    session.abandoned(str(exc))
                else:
                    try:
                        if session.failed(str(exc) or type(exc).__name__):
                            self._tell(engine, member, State.FAIL)
                            continue
                    except Exception:  # the storage itself may be what broke; keep the first error
                        pass
                self._release(engine, member)


def run_trials(study: optuna.Study, runner: TrialRunner, pack: int, n_trials: int | None,
               timeout: float | None, handler: RetryDeadTrial, stop_within: float = defaults.STOP_WITHIN,
               ramp: int | None = None, study_total: int | None = None, ahead: Any = None) -> None:
    """Runs a worker's share of trials: `WorkerLoop(...).run()`."""
    WorkerLoop(study, runner, pack, n_trials, timeout, handler, stop_within, ramp,
               study_total, ahead).run()
