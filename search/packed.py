"""`--pack P`: a worker keeps up to P trials in flight and trains them as stacked models.

Trials are asked from Optuna (ask/tell), so any sampler works. A trial's shape settings
(`trainer.config.pack_key`: batch size, optimiser, augmentation, dataset, epochs, local-method
settings, precision, ...) choose its pack; continuous settings (lr, betas, weight decay, T_max,
warm-up, seed, ...) differ freely inside one. The worker holds one engine per shape key, all
its in-flight trials together never more than P, and runs one epoch of each engine in turn.
Between epochs every trial is reported, pruned, failed or completed on its own, exactly like an
unpacked one (TrialSession), and the freed slots are refilled with newly asked trials while the
budget lasts. Each trial checkpoints in the unpacked format, so a retry resumes in any pack.
"""

from __future__ import annotations

import time

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread

from search.recovery import STOP, Interrupted, RetryDeadTrial, requeue_interrupted
from search.study import TrialRunner, TrialSession
from trainer.config import ConfigError, pack_key

State = optuna.trial.TrialState


class _Slot:
    """A trial in flight: its session and its Optuna heartbeat (database storages)."""

    def __init__(self, session: TrialSession, storage):
        self.session = session
        self.heartbeat = get_heartbeat_thread(session.trial._trial_id, storage)
        self.heartbeat.start()

    def end(self) -> None:
        self.heartbeat.join()


def run_packed(study: optuna.Study, runner: TrialRunner, pack: int, n_trials: int | None,
               timeout: float | None, handler: RetryDeadTrial) -> None:
    """Runs this worker's share (`n_trials` asked trials, or until `timeout`) in packs."""
    from trainer.engine import Engine
    from trainer.runtime import prepare

    engines: dict[tuple, Engine] = {}
    slots: dict = {}  # engine member -> _Slot
    asked, start = 0, time.monotonic()

    def budget_left() -> bool:
        return ((n_trials is None or asked < n_trials)
                and (timeout is None or time.monotonic() - start < timeout) and not STOP.raised)

    def finish(engine: Engine, member, state: State, values: list[float] | None = None) -> None:
        slot = slots.pop(member)
        engine.remove(member)
        slot.end()
        study.tell(slot.session.trial, values if state == State.COMPLETE else None, state=state)

    try:
        while True:
            while len(slots) < pack and budget_left():
                optuna.storages.fail_stale_trials(study)
                trial = study.ask()
                asked += 1
                try:
                    session = runner.begin(trial)
                except ConfigError:
                    study.tell(trial, state=State.FAIL)
                    continue
                key = pack_key(session.config)
                if key not in engines:
                    engines[key] = Engine(prepare(session.config))
                slots[engines[key].add(session.config, session.resume)] = _Slot(
                    session, study._storage)
            if not slots:
                return
            for key, engine in list(engines.items()):
                if not engine.members:
                    del engines[key]
                    continue
                for member, metrics, error in engine.run_epoch():
                    session = slots[member].session
                    if error is not None:
                        session.failed(str(error))
                        finish(engine, member, State.FAIL)
                        continue
                    try:
                        session.on_epoch(metrics)
                    except optuna.TrialPruned as exc:
                        session.pruned(str(exc))
                        finish(engine, member, State.PRUNED)
                        continue
                    if member.epoch >= member.config.epochs:
                        values = session.values(member.history)
                        session.completed(values, member.epoch)
                        finish(engine, member, State.COMPLETE, values)
                    else:
                        session.save(engine.state(member))
            if STOP.raised:  # a safe point: every trial in flight has reported and saved
                raise Interrupted
    except (Interrupted, KeyboardInterrupt):
        for engine in engines.values():
            for member in list(engine.members):
                slot = slots[member]
                slot.session.interrupted(f"interrupted after epoch {member.epoch}; "
                                         "resumes from there")
                finish(engine, member, State.FAIL)
                requeue_interrupted(study, slot.session.trial.number, handler)
        raise KeyboardInterrupt from None
    except BaseException as exc:
        for engine in engines.values():
            for member in list(engine.members):
                slots[member].session.failed(str(exc) or type(exc).__name__)
                finish(engine, member, State.FAIL)
        raise
