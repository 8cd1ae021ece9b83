"""Every use of Optuna's private internals, in one place, each with the reason it is needed.

Optuna's public API has no way to do these few things; an Optuna release may rename any of
them, so they live here and `tests/test_optuna_seam.py` fails (naming the one that moved) when
the installed Optuna no longer has them, instead of a worker breaking somewhere unexpected.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import optuna

# RDBStorage's private methods that Optuna's own _CachedStorage calls on its backend (`study.ask`
# and `tell` go through them): a storage that rides out outages must retry these too.
CACHED_STORAGE_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_trials",
                        "_set_trial_param")
# RDBStorage's query for trials whose heartbeat is stale: overridden to give workers a grace
# period after a database outage (their missed beats are not deaths).
STALE_TRIALS_QUERY = "_get_stale_trial_ids"


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage: reads by trial id (fencing, reaping) and heartbeats need it, and
    `Study` does not expose it."""
    return study._storage


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """A trial's storage id (not its number): the key of every per-trial storage call."""
    return trial._trial_id


def heartbeat_thread(trial: optuna.Trial, study: optuna.Study) -> Any:
    """Optuna's own heartbeat thread for an asked trial (what `optimize` starts per trial); our
    worker loop asks and tells itself, so it starts the beat itself. A no-op thread on storages
    without heartbeats. Start it with `.start()`, end it with `.join()`."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial_id(trial), storage_of(study))


@contextlib.contextmanager
def optimize_loop(study: optuna.Study) -> Iterator[None]:
    """Marks the block as Optuna's optimize loop, the protocol samplers rely on: GridSampler
    calls `study.stop()` when its grid is exhausted, which is only allowed inside that loop,
    and sets the flag `stop_requested` reads."""
    study._thread_local.in_optimize_loop, study._stop_flag = True, False
    try:
        yield
    finally:
        study._thread_local.in_optimize_loop = False


def stop_requested(study: optuna.Study) -> bool:
    """True once a sampler (or a callback) called `study.stop()` inside `optimize_loop`."""
    return bool(study._stop_flag)


def get_trial(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial
              ) -> optuna.trial.FrozenTrial:
    """One trial read fresh from the storage (one query: fencing checks a trial's state every
    epoch, and `study.get_trials` would read them all)."""
    return storage_of(study).get_trial(trial_id(trial))


def fail_if_running(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Sets a RUNNING trial of another process to FAIL; False when someone else ended it first
    (the storage locks the row, one side wins). `study.tell` cannot: it refuses trials this
    process did not ask."""
    try:
        return storage_of(study).set_trial_state_values(trial_id(trial),
                                                        state=optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


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


def reported(trial: optuna.Trial, step: int) -> bool:
    """Whether the trial holds a report at `step` (a retry inherits its predecessor's; Optuna
    keeps an epoch's first report). `Trial` keeps them private."""
    return step in trial._cached_frozen_trial.intermediate_values


_PERCENTILE = threading.Lock()


@contextlib.contextmanager
def percentiles_once(memo: dict) -> Iterator[None]:
    """Inside the block, PercentilePruner's percentile of the complete trials' values at a
    step is computed once per `memo` (a pass over every complete trial, per call otherwise):
    for a caller that hands it the same complete trials until it clears the memo."""
    from optuna.pruners import _percentile as module

    compute = module._get_percentile_intermediate_result_over_trials

    def once(completed: list, direction: Any, step: int, percentile: float, n_min: int) -> float:
        key = (step, direction, percentile, n_min)
        if key not in memo:
            memo[key] = compute(completed, direction, step, percentile, n_min)
        return memo[key]

    with _PERCENTILE:
        module._get_percentile_intermediate_result_over_trials = once
        try:
            yield
        finally:
            module._get_percentile_intermediate_result_over_trials = compute


def ask_waiting(study: optuna.Study) -> optuna.Trial | None:
    """`study.ask()` for a waiting trial only (a retry): None when none waits, where `ask`
    would create a new trial. Claiming it is the storage's atomic WAITING -> RUNNING, as in
    `ask` (`Study._pop_waiting_trial_id`)."""
    study._thread_local.cached_all_trials = None
    trial_id_ = study._pop_waiting_trial_id()
    return None if trial_id_ is None else optuna.Trial(study, trial_id_)


def start_trial(study: optuna.Study, params: dict[str, Any],
                distributions: dict[str, Any], user_attrs: dict[str, Any]) -> optuna.Trial:
    """A RUNNING trial of this process with the given parameters (a PBT segment: a donor's
    values, explored). `enqueue_trial` + `ask` would let any worker, or a waiting retry, take
    its place; the storage's own `create_new_trial` with a template makes it ours at once, and
    `Trial`'s suggest methods then return these values. `Study` keeps its id private."""
    template = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params=params,
                                         distributions=distributions, user_attrs=user_attrs)
    trial_id_ = storage_of(study).create_new_trial(study._study_id, template_trial=template)
    return optuna.Trial(study, trial_id_)


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """What the storage held for an asked trial when it was asked (its system attributes say
    whether it is a retry), without reading it again. `Trial` keeps it private."""
    return trial._cached_frozen_trial


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None,
         state: optuna.trial.TrialState) -> None:
    """`study.tell` without reading the trial back: `Study.tell` returns a fresh copy of it,
    which a worker never uses (one more read of the trial, six queries on a database)."""
    from optuna.study._tell import _tell_with_warning

    _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state)


def ask_new(study: optuna.Study) -> optuna.Trial:
    """`study.ask()` that creates a new trial without first looking for a waiting one (one
    read of every unfinished trial, per ask): for a caller that read, for a whole batch of
    asks, that none waits. On a database, the `Trial` is made from the trial the create
    returned, not read back (`Trial()` reads it: six queries)."""
    study._thread_local.cached_all_trials = None  # as `ask`: the sampler reads afresh
    storage = storage_of(study)
    trial_id_ = storage.create_new_trial(study._study_id)
    if not hasattr(storage, "_trial_id_to_study_id_and_number"):  # not Optuna's cache
        return optuna.Trial(study, trial_id_)
    with storage._lock:
        made = _cached(storage, trial_id_)
        made = None if made is None else copy.deepcopy(made)
    if made is None:
        return optuna.Trial(study, trial_id_)
    read = type(storage).get_trial
    storage.get_trial = lambda t: made if t == trial_id_ else read(storage, t)
    try:
        return optuna.Trial(study, trial_id_)
    finally:
        del storage.get_trial


@contextlib.contextmanager
def reads_once(study: optuna.Study) -> Iterator[None]:
    """Inside the block, the study's trials are read from its database once (at the first
    read), not at every read: Optuna's cache of a database re-reads every unfinished trial
    (a pack's 64, with their reports) each time its sampler reads the study. A batch of trials
    sampled inside sees that read plus what this process writes (`one_write` writes through
    the cache); trials other workers start meanwhile are seen by the next batch, as by a
    sampler that read a moment earlier. Other storages read as they do."""
    storage = storage_of(study)
    read = getattr(storage, "_read_trials_from_remote_storage", None)
    if read is None:
        yield
        return
    done: set[int] = set()

    def once(study_id: int) -> None:
        if study_id not in done:
            read(study_id)
            done.add(study_id)

    storage._read_trials_from_remote_storage = once
    try:
        yield
    finally:
        del storage._read_trials_from_remote_storage


@contextlib.contextmanager
def one_write(trial: optuna.Trial) -> Iterator[None]:
    """A trial's start written at once: the parameters its suggest calls draw and the
    attributes set on it inside the block (by us, or by its sampler: TPE's constant liar) go
    to the storage in one transaction (a database) or one append (the journal file) when the
    block ends, even by an exception; Optuna writes, commits and fsyncs each on its own. The
    trial's own copy is updated call by call as Optuna updates it, so the block reads back
    what it set. Another storage: call by call. Writes to other trials pass straight through."""
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
        params, attrs = held.take()
        if params or attrs:
            _write_start(storage, params, attrs)


_HOLDING = threading.Lock()


def _route(storage: Any, holds: dict[int, _Held], name: str) -> Any:
    write = getattr(type(storage), name)

    def routed(trial_id_: int, *args: Any, **kwargs: Any) -> None:
        held = holds.get(trial_id_)
        if held is None or not held.hold(name, trial_id_, *args, **kwargs):
            write(storage, trial_id_, *args, **kwargs)

    return routed


class _Held:
    """One trial's writes held until its `one_write` block ends; False from `hold` once taken
    (a thread may still write after the block: it writes through)."""

    WRITES = ("set_trial_param", "set_trial_user_attr", "set_trial_system_attr")

    def __init__(self, trial_id_: int):
        self.trial_id, self._lock, self._taken = trial_id_, threading.Lock(), False
        self._params: list[tuple[int, str, float, Any]] = []
        self._attrs: list[tuple[int, str, Any, bool]] = []  # (trial, key, value, system?)

    def hold(self, name: str, trial_id_: int, *args: Any, **kwargs: Any) -> bool:
        with self._lock:
            if self._taken:
                return False
            if name == "set_trial_param":
                self._params.append((trial_id_, *_args(args, kwargs, "param_name",
                                                       "param_value_internal", "distribution")))
            else:
                self._attrs.append((trial_id_, *_args(args, kwargs, "key", "value"),
                                    name == "set_trial_system_attr"))
            return True

    def take(self) -> tuple[list, list]:
        with self._lock:
            self._taken = True
            return self._params, self._attrs


def _args(args: tuple, kwargs: dict[str, Any], *names: str) -> tuple:
    """A storage call's arguments after the trial id, by position or by Optuna's names."""
    return (*args, *(kwargs[n] for n in names[len(args):]))


def _write_start(storage: optuna.storages.BaseStorage, params: list, attrs: list) -> None:
    backend = getattr(storage, "_backend", None)  # Optuna wraps an RDBStorage in a cache
    if hasattr(backend, "write_start"):  # search.study.storage.ResilientRDBStorage
        with storage._lock:  # as `_CachedStorage.set_trial_param`: the study's known distribution
            studies = [storage._studies[storage._trial_id_to_study_id_and_number[t][0]]
                       for t, _, _, _ in params]
            known = [study.param_distribution.get(p[1]) for study, p in zip(studies, params, strict=True)]
        backend.write_start([(*p, k) for p, k in zip(params, known, strict=True)], attrs)
        with storage._lock:
            for study, (_, name, _, distribution) in zip(studies, params, strict=True):
                study.param_distribution.setdefault(name, distribution)
            _write_through(storage, params, attrs)
    elif isinstance(storage, optuna.storages.JournalStorage):
        from optuna.distributions import distribution_to_json
        from optuna.storages.journal._storage import JournalOperation as Op

        _journal_append(storage, [
            *({"op_code": Op.SET_TRIAL_PARAM, "trial_id": t, "param_name": name,
               "param_value_internal": value, "distribution": distribution_to_json(dist)}
              for t, name, value, dist in params),
            *({"op_code": Op.SET_TRIAL_SYSTEM_ATTR if system else Op.SET_TRIAL_USER_ATTR,
               "trial_id": t, "system_attr" if system else "user_attr": {key: value}}
              for t, key, value, system in attrs)])
    else:
        for t, name, value, dist in params:
            storage.set_trial_param(t, name, value, dist)
        for t, key, value, system in attrs:
            (storage.set_trial_system_attr if system else storage.set_trial_user_attr)(t, key, value)


def _write_through(storage: Any, params: list, attrs: list) -> None:
    """The writes into Optuna's cache of the database's trials too (`reads_once`); the next
    read from the database replaces a running trial's copy whole anyway."""
    for t, name, value, distribution in params:
        if (trial := _cached(storage, t)) is not None:
            trial.params[name] = distribution.to_external_repr(value)
            trial.distributions[name] = distribution
    for t, key, value, system in attrs:
        if (trial := _cached(storage, t)) is not None:
            (trial.system_attrs if system else trial.user_attrs)[key] = value


def _cached(storage: Any, trial_id_: int) -> optuna.trial.FrozenTrial | None:
    study_id, number = storage._trial_id_to_study_id_and_number.get(trial_id_, (None, None))
    trial = storage._studies[study_id].trials.get(number) if study_id is not None else None
    return trial if trial is not None and not trial.state.is_finished() else None
