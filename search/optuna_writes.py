"""The write half of `search.optuna_seam`, by the same rule (every private name of Optuna's
used here, and the seam's tests fail when one moves): a pack's epoch (`write_reports`) and a
trial's start or end (`one_write`) in one transaction or one journal append, instead of a
few statements and a commit (or an fsync) per call, as Optuna writes them."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import optuna
from optuna import distributions

from search.optuna_seam import cached_running, storage_of, trial_id

# SQLAlchemy's models are imported when first used: they cost a worker on the journal file nothing


def write_reports(study: optuna.Study, values: list[tuple[optuna.Trial, int, float]],
                  attrs: list[tuple[optuna.Trial, str, Any]]) -> bool:
    """A pack's epoch written at once: each trial's intermediate value and user attributes in
    one transaction (PostgreSQL, MySQL, SQLite) or one append (the journal file) instead of
    one per call -- Optuna writes (and commits, and fsyncs) every report on its own. False,
    nothing written, on a storage without such a path (each trial then reports itself).
    Each `Trial` keeps its own copy of what it reported (`should_prune` reads it there), so
    that copy is updated as `Trial.report` / `set_user_attr` update it."""
    storage = storage_of(study)
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    if hasattr(backend, "write_reports"):  # search.study.storage.ResilientRDBStorage
        backend.write_reports([(trial_id(t), s, v) for t, s, v in values],
                              [(trial_id(t), k, v) for t, k, v in attrs])
    elif isinstance(storage, optuna.storages.JournalStorage):
        from optuna.storages.journal._storage import JournalOperation as Op

        _journal_append(storage, [
            *({"op_code": Op.SET_TRIAL_INTERMEDIATE_VALUE, "trial_id": trial_id(t), "step": s,
               "intermediate_value": v} for t, s, v in values),
            *({"op_code": Op.SET_TRIAL_USER_ATTR, "trial_id": trial_id(t), "user_attr": {k: v}}
              for t, k, v in attrs)])
    else:
        return False
    for t, s, v in values:
        t._cached_frozen_trial.intermediate_values[s] = v
    for t, k, v in attrs:
        t._cached_frozen_trial.user_attrs[k] = v
    return True


def _journal_append(storage: optuna.storages.JournalStorage, logs: list[dict[str, Any]]) -> None:
    """Several of JournalStorage's operations as one append, as its own writes make each: this
    process's worker id on every one, the append, then the replay (which raises what the
    operation would have raised)."""
    worker = storage._replay_result.worker_id
    with storage._thread_lock:
        storage._backend.append_logs([{**log, "worker_id": worker} for log in logs])
        storage._sync_with_backend()


@contextlib.contextmanager
def one_write(trial: optuna.Trial) -> Iterator[None]:
    """A trial's start, or its end, written at once: the parameters its suggest calls draw,
    the attributes set on it inside the block (by us, or by its sampler: TPE's constant liar)
    and its state when it is told (`tell`) go to the storage in one transaction (a database)
    or one append (the journal file) when the block ends, even by an exception; Optuna
    writes, commits and fsyncs each on its own. The trial's own copy is updated call by call
    as Optuna updates it, so the block reads back what it set. Another storage: call by call.
    Writes to other trials pass straight through."""
    storage, held = trial.storage, _Held(trial_id(trial))
    with _HOLDING:
        holds = storage.__dict__.get("_search_held")
        if holds is None:  # the storage's writes are routed through the holds while any is open
            holds = storage._search_held = {}
            for name in _Held.WRITES:
                setattr(storage, name, _route(storage, holds, name))
        holds[held.trial_id] = held
    try:
        yield
    finally:
        with _HOLDING:
            del holds[held.trial_id]
            if not holds:
                for name in ("_search_held", *_Held.WRITES):
                    delattr(storage, name)
        params, attrs, end = held.take()
        if params or attrs or end:
            _write_held(storage, params, attrs, end)


_HOLDING = threading.Lock()


def _route(storage: Any, holds: dict[int, _Held], name: str) -> Any:
    write = getattr(type(storage), name)

    def routed(trial_id_: int, *args: Any, **kwargs: Any) -> Any:
        held = holds.get(trial_id_)
        if held is None or not held.hold(name, trial_id_, *args, **kwargs):
            return write(storage, trial_id_, *args, **kwargs)
        return True

    return routed


class _Held:
    """One trial's writes held until its `one_write` block ends; False from `hold` once taken
    (a thread may still write after the block: it writes through)."""

    WRITES = ("set_trial_param", "set_trial_user_attr", "set_trial_system_attr",
              "set_trial_state_values")

    def __init__(self, trial_id_: int):
        self.trial_id, self._lock, self._taken = trial_id_, threading.Lock(), False
        self._params: list[tuple[int, str, float, Any]] = []
        self._attrs: list[tuple[int, str, Any, bool]] = []  # (trial, key, value, system?)
        self._end: tuple[int, Any, Any] | None = None  # (trial, state, values): `tell`'s write

    def hold(self, name: str, trial_id_: int, *args: Any, **kwargs: Any) -> bool:
        with self._lock:
            if self._taken:
                return False
            if name == "set_trial_state_values":
                state, values = _args(args, kwargs, "state", "values")
                if not state.is_finished():  # a start (WAITING -> RUNNING) answers at once
                    return False
                self._end = (trial_id_, state, values)
            elif name == "set_trial_param":
                self._params.append((trial_id_, *_args(args, kwargs, "param_name",
                                                       "param_value_internal", "distribution")))
            else:
                self._attrs.append((trial_id_, *_args(args, kwargs, "key", "value"),
                                    name == "set_trial_system_attr"))
            return True

    def take(self) -> tuple[list, list, tuple | None]:
        with self._lock:
            self._taken = True
            return self._params, self._attrs, self._end


def _args(args: tuple, kwargs: dict[str, Any], *names: str) -> tuple:
    """A storage call's arguments after the trial id, by position or by Optuna's names."""
    return (*args, *(kwargs[n] for n in names[len(args):]))


def _write_held(storage: optuna.storages.BaseStorage, params: list, attrs: list,
                end: tuple | None) -> None:
    """A trial's held writes: its parameters, its attributes, then its end (`tell`'s state and
    values), all in one transaction or one append."""
    backend = getattr(storage, "_backend", None)  # Optuna wraps an RDBStorage in a cache
    if hasattr(backend, "write_held"):  # search.study.storage.ResilientRDBStorage
        with storage._lock:  # as `_CachedStorage.set_trial_param`: the study's known distribution
            studies = [storage._studies[storage._trial_id_to_study_id_and_number[t][0]]
                       for t, _, _, _ in params]
            known = [study.param_distribution.get(p[1]) for study, p in zip(studies, params, strict=True)]
        backend.write_held([(*p, k) for p, k in zip(params, known, strict=True)], attrs, end)
        with storage._lock:
            for study, (_, name, _, distribution) in zip(studies, params, strict=True):
                study.param_distribution.setdefault(name, distribution)
            _write_through(storage, params, attrs)
    elif isinstance(storage, optuna.storages.JournalStorage):
        from datetime import UTC, datetime

        from optuna.distributions import distribution_to_json
        from optuna.storages.journal._storage import JournalOperation as Op

        _journal_append(storage, [
            *({"op_code": Op.SET_TRIAL_PARAM, "trial_id": t, "param_name": name,
               "param_value_internal": value, "distribution": distribution_to_json(dist)}
              for t, name, value, dist in params),
            *({"op_code": Op.SET_TRIAL_SYSTEM_ATTR if system else Op.SET_TRIAL_USER_ATTR,
               "trial_id": t, "system_attr" if system else "user_attr": {key: value}}
              for t, key, value, system in attrs),
            *([{"op_code": Op.SET_TRIAL_STATE_VALUES, "trial_id": end[0], "state": end[1],
                "values": end[2], "datetime_complete": datetime.now(tz=UTC).isoformat(
                    timespec="microseconds")}] if end else [])])
    else:
        for t, name, value, dist in params:
            storage.set_trial_param(t, name, value, dist)
        for t, key, value, system in attrs:
            (storage.set_trial_system_attr if system else storage.set_trial_user_attr)(t, key, value)
        if end:
            storage.set_trial_state_values(*end)


def _write_through(storage: Any, params: list, attrs: list) -> None:
    """The writes into Optuna's cache of the database's trials too (`reads_once`); the next
    read from the database replaces a running trial's copy whole anyway."""
    for t, name, value, distribution in params:
        if (trial := cached_running(storage, t)) is not None:
            trial.params[name] = distribution.to_external_repr(value)
            trial.distributions[name] = distribution
    for t, key, value, system in attrs:
        if (trial := cached_running(storage, t)) is not None:
            (trial.system_attrs if system else trial.user_attrs)[key] = value


def rdb_write_reports(storage: optuna.storages.RDBStorage, values: list[tuple[int, int, float]],
                      attrs: list[tuple[int, str, Any]]) -> None:
    """`write_reports` on a database: RDBStorage's own per-call steps (each checks that its
    trial still runs; a step's value is inserted, or replaces the one stored), in one
    transaction of a few statements for the whole pack instead of a few per call."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    Value = models.TrialIntermediateValueModel  # noqa: N806 (a model class)
    ids = {t for t, _, _ in values} | {t for t, _, _ in attrs}
    with _create_scoped_session(storage.scoped_session, True) as session:
        _check_running(storage, session, ids)  # all, first: none is written if one ended
        stored = {(row.trial_id, row.step): row for row in session.query(Value).filter(
            Value.trial_id.in_({t for t, _, _ in values}),
            Value.step.in_({s for _, s, _ in values}))} if values else {}
        for trial_id_, step, value in values:
            number, kind = Value.intermediate_value_to_stored_repr(value)
            if (row := stored.get((trial_id_, step))) is None:
                session.add(Value(trial_id=trial_id_, step=step, intermediate_value=number,
                                  intermediate_value_type=kind))
            else:
                row.intermediate_value, row.intermediate_value_type = number, kind
        _upsert_attrs(storage, session, models.TrialUserAttributeModel,
                      {(t, k): v for t, k, v in attrs})


def rdb_write_held(storage: optuna.storages.RDBStorage, params: list[tuple[int, str, float, Any, Any]],
                    attrs: list[tuple[int, str, Any, bool]], end: tuple[int, Any, Any] | None = None
                    ) -> None:
    """`one_write` on a database: RDBStorage's own per-call checks (the trial still runs; a
    parameter's distribution against the study's: `known`, or the one stored) and writes, in
    one transaction: one read of the trials' states, the parameters inserted, each attribute
    table upserted in one statement, then the trial's end (`end`: as `set_trial_state_values`
    writes a finished state and its values, the trial's row locked first)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    ids = {p[0] for p in params} | {a[0] for a in attrs}
    with _create_scoped_session(storage.scoped_session, True) as session:
        ending, study_of = None, {}
        if end is not None:  # as set_trial_state_values: the row locked first, then checked
            ending = models.TrialModel.find_or_raise_by_id(end[0], session, for_update=True)
            storage.check_trial_is_updatable(end[0], ending.state)
            study_of[end[0]] = ending.study_id
            ids.discard(end[0])  # read once, not again by the check below
        if ids:
            study_of.update(_check_running(storage, session, ids))
        for trial_id_, name, value, distribution, known in params:
            if known is None:  # as RDBStorage: the study's first such parameter, if any
                first = (session.query(models.TrialParamModel.distribution_json)
                         .join(models.TrialModel).filter(models.TrialModel.study_id == study_of[trial_id_])
                         .filter(models.TrialParamModel.param_name == name).first())
                known = None if first is None else distributions.json_to_distribution(first[0])
            if known is not None:
                distributions.check_distribution_compatibility(known, distribution)
            session.add(models.TrialParamModel(
                trial_id=trial_id_, param_name=name, param_value=value,
                distribution_json=distributions.distribution_to_json(distribution)))
        for system, model in ((False, models.TrialUserAttributeModel),
                              (True, models.TrialSystemAttributeModel)):
            _upsert_attrs(storage, session, model, {(t, k): v for t, k, v, s in attrs if s == system})
        if ending is not None:
            _, state, values = end
            for objective, value in enumerate(values or []):
                storage._set_trial_value_without_commit(session, ending, objective, value)
            ending.state, ending.datetime_complete = state, datetime.now()


def _check_running(storage: optuna.storages.RDBStorage, session: Any, ids: set[int]) -> dict[int, int]:
    """One read of the trials' states, each checked as RDBStorage checks it before a write
    (KeyError when missing, UpdateFinishedTrialError when it ended); their studies' ids."""
    from optuna.storages._rdb import models

    Trial = models.TrialModel  # noqa: N806 (a model class)
    rows = {r.trial_id: r for r in session.query(Trial.trial_id, Trial.study_id, Trial.state)
            .filter(Trial.trial_id.in_(ids))}
    for trial_id_ in ids:
        if trial_id_ not in rows:
            raise KeyError(models.NOT_FOUND_MSG)
        storage.check_trial_is_updatable(trial_id_, rows[trial_id_].state)
    return {t: r.study_id for t, r in rows.items()}


def _upsert_attrs(storage: optuna.storages.RDBStorage, session: Any, model: Any,
                  latest: dict[tuple[int, str], Any]) -> None:
    """Attributes inserted or replaced (the last value per trial and key, as calls in turn
    leave them): one statement on PostgreSQL and SQLite, RDBStorage's own per-call write on
    other databases."""
    if not latest:
        return
    if storage.engine.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif storage.engine.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert
    else:
        for (trial_id_, key), value in latest.items():
            storage._set_trial_attr_without_commit(session, model, trial_id_, key, value)
        return
    stmt = insert(model).values([{"trial_id": t, "key": k, "value_json": json.dumps(v)}
                                 for (t, k), v in latest.items()])
    session.execute(stmt.on_conflict_do_update(index_elements=[model.trial_id, model.key],
                                               set_={"value_json": stmt.excluded.value_json}))
