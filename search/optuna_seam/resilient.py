"""A database storage that rides out outages: RDBStorage whose every call -- the public API,
the private calls Optuna's own cache makes on its backend, the stale-trial query, and the
batched writes of `writes` -- retries through a lost connection for up to the patience, then
stops the command in one line. Private names of Optuna's are overridden here, so it lives in
the seam."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time

import optuna

from search import defaults
from search.errors import StorageUnavailable
from search.logs import redact, say
from search.optuna_seam import rdb

# RDBStorage's private methods that Optuna's own _CachedStorage calls on its backend (`study.ask`
# and `tell` go through them): a storage that rides out outages must retry these too.
CACHED_STORAGE_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_trials",
                        "_set_trial_param")
# RDBStorage's query for trials whose heartbeat is stale: overridden to give workers a grace
# period after a database outage (their missed beats are not deaths).
STALE_TRIALS_QUERY = "_get_stale_trial_ids"


_CONNECTION_LOST = ("server closed the connection", "connection refused", "could not connect",
              "terminating connection", "connection already closed", "the database system is",
              "ssl connection has been closed", "connection reset", "no connection to the server")


def _connection_lost(exc: BaseException | None) -> bool:
    """A lost or refused database connection (a restart, a network blip), worth retrying;
    Optuna wraps such errors (StorageInternalError), so the cause chain is searched."""
    from sqlalchemy import exc as sa_exc

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            return True
        text = str(exc).lower()
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) and any(
                t in text for t in _CONNECTION_LOST):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Outage:
    """What this process knows of its storage's availability: one line when it stops
    answering, one when it answers again, and when the last outage ended (trials' heartbeats
    are stale right after one, through no fault of their workers)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down_since: float | None = None
        self.back_at: float | None = None

    def failed(self, url: str, exc: BaseException, patience: float) -> float:
        """Notes a failed call; returns how long the storage has been silent."""
        now = time.monotonic()
        with self.lock:
            if self.down_since is None:
                self.down_since = now
                reason = _root_cause(exc)
                say(f"storage {redact(url)} does not answer ({reason}); trials wait "
                    f"for it at their epoch's end, up to {_minutes(patience)}")
            return now - self.down_since

    def answered(self, url: str) -> None:
        if self.down_since is None:
            return
        with self.lock:
            if self.down_since is None:
                return
            now = time.monotonic()
            say(f"storage {redact(url)} answers again after "
                f"{_minutes(now - self.down_since)}")
            self.down_since, self.back_at = None, now


def _root_cause(exc: BaseException) -> str:
    """The driver's own words (Optuna wraps them in a generic commit message)."""
    inner: BaseException | None = exc
    seen = 0
    while inner is not None and seen < 10:
        orig = getattr(inner, "orig", None)
        if orig is not None and str(orig).strip():
            return str(orig).strip().splitlines()[0][:160]
        inner, seen = inner.__cause__ or inner.__context__, seen + 1
    return str(exc).strip().splitlines()[0][:160] or type(exc).__name__


_OUTAGES: dict[str, Outage] = {}  # one per database and process: each outage said once


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StorageBusy(Exception):
    """A call made with `no_waiting` met an outage: the caller keeps going and retries later."""


_LOCAL = threading.local()


@contextlib.contextmanager
def no_waiting(storage: optuna.storages.BaseStorage):
    """Storage calls in this block fail at once with StorageBusy during an outage (instead of
    retrying for up to the patience): a trial trains on and sends what it owes later. Past
    the patience they raise StorageUnavailable as always. A no-op for other storages."""
    if resilient_backend(storage) is None:
        yield
        return
    _LOCAL.no_waiting = True
    try:
        yield
    finally:
        _LOCAL.no_waiting = False


def _with_retry(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        delay = 0.5
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                silent = self.outage.failed(self.url, exc, self.patience)
                if getattr(_LOCAL, "no_waiting", False) and silent < self.patience:
                    raise StorageBusy from None
                if silent >= self.patience:
                    raise StorageUnavailable(
                        f"storage {redact(self.url)} did not answer for {_minutes(silent)} "
                        "(--storage-patience); this command stops, its trials resume from their "
                        "checkpoints with the next command on the study") from None
                time.sleep(min(delay, max(0.1, self.patience - silent)))
                delay = min(delay * 2, 8.0)
                continue
            self.outage.answered(self.url)
            return result

    return call


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage that rides out a database outage (a restart, a failover): its calls retry
    with backoff for up to `patience` seconds of silence, then raise StorageUnavailable (one
    line, no traceback). Heartbeats never raise (a missed beat is retried at the next one), and
    no trial is found stale until its workers have had a grace period to beat again after an
    outage: a paused database must not look like dead workers. Made by `resilient_storage`,
    which wraps every storage call in the retry."""

    patience = defaults.STORAGE_PATIENCE

    def __init__(self, url: str, *args, patience: float | None = None, **kwargs) -> None:
        self.url, self.outage = url, _OUTAGES.setdefault(url, Outage())
        if patience is not None:
            self.patience = patience
        super().__init__(url, *args, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # runs in Optuna's heartbeat thread: never a traceback there
            if _connection_lost(exc):
                self.outage.failed(self.url, exc, self.patience)
            return
        self.outage.answered(self.url)

    def stale_trial_ids(self, stale: list[int]) -> list[int]:
        """The stale trials RDBStorage found, or none right after an outage."""
        back = self.outage.back_at
        settle = 2 * (self.grace_period or 0) + 10  # every worker's next beat, and some
        if back is not None and time.monotonic() - back < settle:
            return []  # heartbeats missed during the outage are not deaths
        return stale

    # the batched writes of `search.optuna_seam.writes` (SQL in `rdb`), ridden out like every call:
    # a pack's epoch; a trial's start or end (parameters, attributes, state); a refill's new
    # trials; trials handed back unused -- each in one transaction
    write_reports = _with_retry(rdb.write_reports)
    write_held = _with_retry(rdb.write_held)
    create_trials = _with_retry(rdb.create_trials)
    hand_back = _with_retry(rdb.hand_back)


@functools.cache
def resilient_storage() -> type[ResilientRDBStorage]:
    """ResilientRDBStorage, its RDBStorage calls wrapped in the retry on first use (importing
    this module changes nothing): the public API, the private calls Optuna's own cache makes on
    its backend, and the stale-trial query, filtered by `stale_trial_ids` (`optuna_seam`)."""
    cls, base = ResilientRDBStorage, optuna.storages.RDBStorage
    for name, member in vars(base).items():
        if (inspect.isfunction(member) and name not in vars(cls)
                and (not name.startswith("_") or name in CACHED_STORAGE_CALLS)):
            setattr(cls, name, _with_retry(member))
    stale_query = _with_retry(getattr(base, STALE_TRIALS_QUERY))

    def stale(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(stale_query(self, study_id))

    setattr(cls, STALE_TRIALS_QUERY, stale)
    return cls


def resilient_backend(storage: optuna.storages.BaseStorage) -> ResilientRDBStorage | None:
    """The storage's ResilientRDBStorage (Optuna wraps an RDBStorage in a cache), or None."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, ResilientRDBStorage) else None
