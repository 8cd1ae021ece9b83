"""The write half of the seam (reads and asks are in `reads`), by the same rule: every private
name of Optuna's used here, and the seam's tests fail when one moves. A pack's epoch
(`write_reports`), a trial's start or end (`one_write`) and a refill's starts (`create_trials`,
`writes_together`) go in one transaction or one journal append, instead of a few statements and
a commit (or an fsync) per call, as Optuna writes them. The SQL is in `rdb`, run by `resilient`'s
storage."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import optuna

from search.optuna_seam.reads import cached_running, storage_of, trial_id
from search.optuna_seam.resilient import resilient_backend


def write_reports(study: optuna.Study, values: list[tuple[optuna.Trial, int, float]],
                  attrs: list[tuple[optuna.Trial, str, Any]]) -> bool:
    """A pack's epoch written at once: each trial's intermediate value and user attributes in
    one transaction (PostgreSQL, MySQL, SQLite) or one append (the journal file) instead of
    one per call -- Optuna writes (and commits, and fsyncs) every report on its own. False,
    nothing written, on a storage without such a path (each trial then reports itself).
    Each `Trial` keeps its own copy of what it reported (`should_prune` reads it there), so
    that copy is updated as `Trial.report` / `set_user_attr` update it."""
    storage = storage_of(study)
    backend = resilient_backend(storage)
    if backend is not None:
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
    batch, ended = getattr(_BATCH, "helds", None), False
    try:
        yield
        ended = True
    finally:
        if batch is not None and ended and held.end is None:  # `writes_together` writes it
            with storage._lock:  # the next trial's sampler sees it running (TPE's constant liar)
                _write_through(storage, *held.peek())
            batch.append(held)
        else:
            _release(storage, [held])


_HOLDING = threading.Lock()
_BATCH = threading.local()  # the holds of a `writes_together` block open in this thread


def _release(storage: Any, helds: list[_Held]) -> None:
    """The holds' trials no longer routed, and their writes made in one write."""
    with _HOLDING:
        holds = storage._search_held
        for held in helds:
            del holds[held.trial_id]
        if not holds:
            for name in ("_search_held", *_Held.WRITES):
                delattr(storage, name)
    # the starts together; a trial ended meanwhile (an error's path) after them, on its own
    for group in ([h for h in helds if h.end is None], *([h] for h in helds if h.end is not None)):
        params, attrs, end = [], [], None
        for held in group:
            p, a, end = held.take()
            params += p
            attrs += a
        if params or attrs or end:
            _write_held(storage, params, attrs, end)


@contextlib.contextmanager
def writes_together(study: optuna.Study) -> Iterator[None]:
    """Inside the block, the starts (`one_write` blocks) that end normally are written at its
    end, all in one transaction: a refill of P trials in one commit instead of P. Each is in
    Optuna's cache of the database at once, so the next trial's sampler sees it running. On
    a database behind Optuna's cache only; a block that raises, or holds an end, writes at
    once, as ever (an end must follow its trial's start)."""
    from optuna.storages._cached_storage import _CachedStorage

    storage = storage_of(study)
    if not isinstance(storage, _CachedStorage) or getattr(_BATCH, "helds", None) is not None:
        yield
        return
    batch: list[_Held] = []
    _BATCH.helds = batch
    try:
        yield
    finally:
        _BATCH.helds = None
        if batch:
            _release(storage, batch)


def hand_back(study: optuna.Study, made: list[optuna.trial.FrozenTrial]) -> None:
    """Trials `create_trials` made that this worker will not start (its budget ended inside
    the refill) set WAITING, as an enqueued trial waits: the next `ask`, of any worker, takes
    one and samples it."""
    if made:
        storage_of(study)._backend.hand_back([trial_id(t) for t in made])


def create_trials(study: optuna.Study, n: int) -> list[optuna.trial.FrozenTrial] | None:
    """`n` new RUNNING trials made in one transaction (the study's row locked once, one insert,
    their numbers counted once, their first heartbeats) instead of Optuna's four statements
    and a commit each, and put in Optuna's cache as its own create puts them. None on other
    storages (the caller creates them one by one, as `ask` does)."""
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    storage = storage_of(study)
    backend = resilient_backend(storage)
    if not isinstance(storage, _CachedStorage) or backend is None:
        return None
    made = backend.create_trials(study._study_id, n)
    with storage._lock:
        storage._studies.setdefault(study._study_id, _StudyInfo())
        storage._add_trials_to_cache(study._study_id, made)
    return made


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
                state = args[0] if args else kwargs["state"]
                if not state.is_finished():  # a start (WAITING -> RUNNING) answers at once
                    return False
                self._end = (trial_id_, state, args[1] if len(args) > 1 else kwargs.get("values"))
            elif name == "set_trial_param":
                self._params.append((trial_id_, *_args(args, kwargs, "param_name",
                                                       "param_value_internal", "distribution")))
            else:
                self._attrs.append((trial_id_, *_args(args, kwargs, "key", "value"),
                                    name == "set_trial_system_attr"))
            return True

    @property
    def end(self) -> tuple | None:
        return self._end

    def peek(self) -> tuple[list, list]:
        with self._lock:
            return list(self._params), list(self._attrs)

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
    backend = resilient_backend(storage)
    if backend is not None:
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
