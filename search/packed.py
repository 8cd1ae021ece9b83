"""The worker loop: up to P trials in flight, trained as stacked models (`--pack P`; P = 1 is
a plain run, the same loop).

Trials are asked from Optuna (ask/tell), so any sampler works. A trial's shape settings
(`trainer.config.pack_key`: batch size, optimiser, augmentation, dataset, epochs, local-method
settings, precision, ...) choose its pack; continuous settings (lr, betas, weight decay, T_max,
warm-up, seed, ...) differ freely inside one. The worker holds one engine per shape key, all
its in-flight trials together never more than P (fewer while the study has heard from few:
`--ramp`, `search.packing.in_flight_limit`), and runs one epoch of each engine in turn.
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

import sys
import time

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread

from search.errors import AttemptLost, StorageUnavailable
from search.packing import in_flight_limit
from search.recovery import STOP, Interrupted, RetryDeadTrial, requeue_interrupted
from search.study import TrialRunner, TrialSession
from trainer.config import ConfigError, pack_key

State = optuna.trial.TrialState


class _Slot:
    """A trial in flight: its session and its Optuna heartbeat (database storages)."""

    def __init__(self, session: TrialSession, heartbeat):
        self.session, self.heartbeat = session, heartbeat

    def end(self) -> None:
        self.heartbeat.join()


def _say(line: str) -> None:
    print(f"search: {line}", file=sys.stderr, flush=True)


def stop_rule(stop_within: float):
    """A signalled worker stops at the next optimiser step (a mid-epoch checkpoint), unless the
    epoch's end is near: it finishes the epoch when the steps left take under half of
    `stop_within` at the pace so far, so a scheduler's grace (Slurm's KillWait, Kubernetes'
    30 s) is never spent on an epoch that cannot end in time."""

    def rule(steps_run: int, steps_left: int, seconds: float) -> bool:
        return STOP.raised and seconds / max(1, steps_run) * steps_left > stop_within / 2

    return rule


def run_trials(study: optuna.Study, runner: TrialRunner, pack: int, n_trials: int | None,
               timeout: float | None, handler: RetryDeadTrial, stop_within: float = 20.0,
               ramp: int | None = None) -> None:
    """Runs this worker's share (`n_trials` trials, or until `timeout`), `pack` at a time
    (with a `ramp`, fewer until the study has heard from as many: `in_flight_limit`)."""
    import torch  # here, as the trainer: commands that never train start without it

    from trainer.engine import Engine
    from trainer.runtime import prepare

    engines: dict[tuple, Engine] = {}
    slots: dict = {}  # engine member -> _Slot
    asked, start = 0, time.monotonic()
    rule = stop_rule(stop_within)

    def budget_left() -> bool:
        return ((n_trials is None or asked < n_trials) and not study._stop_flag
                and (timeout is None or time.monotonic() - start < timeout) and not STOP.raised)

    def release(engine: Engine, member) -> _Slot:
        slot = slots.pop(member)
        engine.remove(member)
        slot.end()
        return slot

    def finish(engine: Engine, member, state: State, values: list[float] | None = None) -> None:
        slot = release(engine, member)
        try:
            study.tell(slot.session.trial, values if state == State.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # taken over since its last check
            _say(slot.session.lost_line())

    def narrower(engine: Engine, new_pack: int) -> int:
        """Out of device memory: every trial of the pack goes back to the queue to resume from
        its last checkpoint (this epoch's steps are lost), the worker packs `new_pack` on."""
        nonlocal asked
        numbers, in_flight = [], len(slots)
        for member in list(engine.members):
            slot = slots[member]
            number = slot.session.trial.number
            if slot.session.interrupted(f"out of device memory in a pack of {in_flight} in "
                                        f"epoch {member.epoch + 1}; resumes from its checkpoint"):
                finish(engine, member, State.FAIL)
                requeue_interrupted(study, number, handler)
                numbers.append(number)
            else:
                drop(engine, member, slot.session.lost_line())
                continue
            asked -= 1  # its retry is this worker's to run again, not a new trial
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _say(f"out of device memory with {in_flight} trials in flight: this "
             f"worker packs at most {new_pack} from now on; trial(s) "
             f"{', '.join(map(str, numbers))} resume from their checkpoints")
        return new_pack

    def too_big(engine: Engine, reason: str) -> None:
        for member in list(engine.members):
            session = slots[member].session
            if session.failed(reason):
                finish(engine, member, State.FAIL)
            else:
                drop(engine, member, session.lost_line())

    def drop(engine: Engine, member, line: str) -> None:
        """A lost attempt: no tell, no MLflow, no checkpoint; its share is asked again."""
        nonlocal asked
        _say(line)
        release(engine, member)
        asked -= 1

    # the protocol of Optuna's own optimize loop, which samplers rely on: GridSampler calls
    # study.stop() when its grid is done, and that is only allowed inside such a loop
    study._thread_local.in_optimize_loop, study._stop_flag = True, False
    try:
        while True:
            # one storage read, and only when a slot is free (no more than an ask reads)
            width = in_flight_limit(study, pack, ramp, len(slots)) if len(slots) < pack else pack
            while len(slots) < width and budget_left():
                optuna.storages.fail_stale_trials(study)
                trial = study.ask()
                asked += 1
                # beating from the ask on: a worker killed while it opens the trial's MLflow run
                # leaves a trial that goes stale, not one RUNNING for ever
                heartbeat = get_heartbeat_thread(trial._trial_id, study._storage)
                heartbeat.start()
                try:
                    session = runner.begin(trial)
                except ConfigError:
                    heartbeat.join()
                    study.tell(trial, state=State.FAIL)
                    continue
                except BaseException:
                    heartbeat.join()
                    raise
                key = pack_key(session.config)
                if session.resume is not None and "partial" in session.resume:
                    key = (key, "inside an epoch", trial.number)  # alone until it ends
                if key not in engines:
                    engines[key] = Engine(prepare(session.config))
                slots[engines[key].add(session.config, session.resume)] = _Slot(session, heartbeat)
            if not slots:
                return
            for key, engine in list(engines.items()):
                if not engine.members:
                    del engines[key]
                    continue
                try:
                    results = engine.run_epoch(rule)
                except torch.OutOfMemoryError as exc:
                    del engines[key]
                    if pack == 1:  # alone and still too big: this trial fails, the worker goes on
                        too_big(engine, f"out of device memory alone: {str(exc).splitlines()[0]}")
                    else:
                        pack = narrower(engine, max(1, min(pack, len(slots)) // 2))
                    continue
                if not results:  # stopped inside the epoch: save where it stands, then stop
                    for member in engine.members:
                        session = slots[member].session
                        if session.owned():
                            session.save(engine.state(member))
                    raise Interrupted
                for member, metrics, error in results:
                    session = slots[member].session
                    if error is not None:
                        if session.failed(str(error)):
                            finish(engine, member, State.FAIL)
                        else:
                            drop(engine, member, session.lost_line())
                        continue
                    try:
                        session.on_epoch(metrics, last=member.epoch >= member.config.epochs)
                    except AttemptLost as exc:
                        drop(engine, member, str(exc))
                        continue
                    except optuna.TrialPruned as exc:
                        session.pruned(str(exc), member.epoch)
                        finish(engine, member, State.PRUNED)
                        continue
                    if member.epoch >= member.config.epochs:
                        values = session.values(member.history)
                        session.completed(values, member.epoch, member.history)
                        finish(engine, member, State.COMPLETE, values)
                    else:
                        session.save(engine.state(member))
            if STOP.raised:  # a safe point: every trial in flight has reported and saved
                raise Interrupted
    except (Interrupted, KeyboardInterrupt):
        for engine in engines.values():
            for member in list(engine.members):
                slot = slots[member]
                where = (f"interrupted in epoch {member.epoch + 1} after step "
                         f"{member.partial['at_step']}" if member.partial is not None
                         else f"interrupted after epoch {member.epoch}")
                if slot.session.interrupted(f"{where}; resumes from there"):
                    finish(engine, member, State.FAIL)
                    requeue_interrupted(study, slot.session.trial.number, handler)
                else:
                    drop(engine, member, slot.session.lost_line())
        raise KeyboardInterrupt from None
    except StorageUnavailable as exc:
        for engine in engines.values():
            for member in list(engine.members):
                slots[member].session.abandoned(str(exc))
                release(engine, member)
        raise
    except BaseException as exc:
        for engine in engines.values():
            for member in list(engine.members):
                session = slots[member].session
                try:
                    if session.failed(str(exc) or type(exc).__name__):
                        finish(engine, member, State.FAIL)
                        continue
                except Exception:  # the storage itself may be what broke; keep the first error
                    pass
                release(engine, member)
        raise
    finally:
        study._thread_local.in_optimize_loop = False
