"""The database half of `search.optuna_seam`: Optuna's RDBStorage steps for a pack's epoch
(`write_reports`) and for a trial's start (`one_write`), each in one transaction of a few
statements instead of a few statements and a commit per call. Same rule as the seam: every
private name of Optuna's used here, and the seam's tests fail when one moves."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import optuna
from optuna import distributions

# imported when first used: SQLAlchemy's models cost a worker on the journal file nothing


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


def rdb_write_start(storage: optuna.storages.RDBStorage, params: list[tuple[int, str, float, Any, Any]],
                    attrs: list[tuple[int, str, Any, bool]]) -> None:
    """`one_write` on a database: RDBStorage's own per-call checks (the trial still runs; a
    parameter's distribution against the study's: `known`, or the one stored) and writes, in
    one transaction: one read of the trials' states, the parameters inserted, each attribute
    table upserted in one statement."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    ids = {p[0] for p in params} | {a[0] for a in attrs}
    with _create_scoped_session(storage.scoped_session, True) as session:
        study_of = _check_running(storage, session, ids)
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
