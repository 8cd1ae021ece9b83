"""The database half of `search.optuna_seam.writes`: its writes as SQL on RDBStorage's own
models, each as RDBStorage checks and makes the calls it replaces, in one transaction. Methods
of `resilient.ResilientRDBStorage`, which retries them through an outage like every call.
SQLAlchemy's models are imported when first used: a worker on the journal file never loads them."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

import optuna
from optuna import distributions


def write_reports(storage: optuna.storages.RDBStorage, values: list[tuple[int, int, float]],
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


def write_held(storage: optuna.storages.RDBStorage, params: list[tuple[int, str, float, Any, Any]],
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
        first: dict[tuple[int, str], Any] = {}  # (study, name) -> its first distribution
        for trial_id_, name, value, distribution, known in params:
            key = (study_of[trial_id_], name)
            if known is None:
                if key not in first:  # as RDBStorage: the study's first one, read once per write
                    row = (session.query(models.TrialParamModel.distribution_json)
                           .join(models.TrialModel).filter(models.TrialModel.study_id == key[0])
                           .filter(models.TrialParamModel.param_name == name).first())
                    first[key] = None if row is None else distributions.json_to_distribution(row[0])
                known = first[key]
            if known is not None:
                distributions.check_distribution_compatibility(known, distribution)
            else:  # the first in the study: a batch's later trials are checked against it
                first[key] = distribution
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


def create_trials(storage: optuna.storages.RDBStorage, study_id: int, n: int
                      ) -> list[optuna.trial.FrozenTrial]:
    """`create_trials` on a database, as RDBStorage creates one trial (the study's row locked,
    the rows inserted, then each numbered by the study's trials before it), for `n` in one
    transaction. With heartbeats, each trial's first beat is written with it: a worker killed
    before it starts them all leaves trials that go stale, not ones RUNNING for ever."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import FrozenTrial, TrialState

    Trial = models.TrialModel  # noqa: N806 (a model class)
    with _create_scoped_session(storage.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        rows = [Trial(study_id=study_id, number=None, state=TrialState.RUNNING,
                      datetime_start=datetime.now()) for _ in range(n)]
        session.add_all(rows)
        session.flush()  # inserted first, then counted, as RDBStorage: SQLite's write lock is ours
        rows.sort(key=lambda row: row.trial_id)
        before = (session.query(Trial).filter(Trial.study_id == study_id)
                  .filter(Trial.trial_id < rows[0].trial_id).count())
        for number, row in enumerate(rows, start=before):
            row.number = number
        if storage.heartbeat_interval is not None:
            session.add_all(models.TrialHeartbeatModel(trial_id=row.trial_id) for row in rows)
        session.flush()
        return [FrozenTrial(number=row.number, state=row.state, value=None, values=None,
                            datetime_start=row.datetime_start, datetime_complete=None, params={},
                            distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                            trial_id=row.trial_id) for row in rows]


def hand_back(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> None:
    """`optuna_writes.hand_back` on a database: the trials WAITING, their heartbeats gone (the
    worker that takes one beats anew; an old beat would make it look stale at once)."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    with _create_scoped_session(storage.scoped_session, True) as session:
        (session.query(models.TrialModel).filter(models.TrialModel.trial_id.in_(trial_ids))
         .filter(models.TrialModel.state == TrialState.RUNNING)
         .update({models.TrialModel.state: TrialState.WAITING}, synchronize_session=False))
        (session.query(models.TrialHeartbeatModel)
         .filter(models.TrialHeartbeatModel.trial_id.in_(trial_ids)).delete(synchronize_session=False))
