"""Where studies live: an Optuna journal file by default, any SQLAlchemy URL otherwise.

The journal file (`search-journal.log` in the working directory) is shared safely by several
processes through file locks. `--storage` or $SEARCH_STORAGE takes a URL (PostgreSQL for many
machines); passwords never appear in messages (`redact`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from search import optuna_rdb, optuna_seam
from search.errors import StorageUnavailable, UserError
from search.logs import say

DEFAULT_STORAGE = "search-journal.log"
STORAGE_ENV = "SEARCH_STORAGE"


def is_file(url: str) -> bool:
    """A journal file path, not a URL: one machine's processes share it through file locks."""
    return "://" not in url


def has_heartbeat(url: str) -> bool:
    """A database URL: Optuna's heartbeat finds dead workers' trials. The journal file and the
    gRPC proxy have none (a worker reaps dead local processes' trials instead)."""
    return not is_file(url) and not url.startswith("grpc://")


def shared_across_machines(url: str) -> bool:
    """A server many nodes reach safely (PostgreSQL, MySQL, the gRPC proxy); a file -- a
    journal or SQLite -- would be shared through file locks, which corrupt it over NFS."""
    return not is_file(url) and not url.startswith("sqlite")


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    if is_file(url):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***"


def storage_url(url: str | None) -> str:
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


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
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    if not getattr(backend, "rides_out_outages", False):
        yield
        return
    _LOCAL.no_waiting = True
    try:
        yield
    finally:
        _LOCAL.no_waiting = False


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage that rides out a database outage (a restart, a failover): its calls retry
    with backoff for up to `patience` seconds of silence, then raise StorageUnavailable (one
    line, no traceback). Heartbeats never raise (a missed beat is retried at the next one), and
    no trial is found stale until its workers have had a grace period to beat again after an
    outage: a paused database must not look like dead workers. Made by `resilient_storage`,
    which wraps every storage call in the retry."""

    patience = 600.0
    rides_out_outages = True  # for `no_waiting`

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


# a pack's epoch in one transaction (`optuna_writes.write_reports`), ridden out like every call
ResilientRDBStorage.write_reports = _with_retry(optuna_rdb.rdb_write_reports)  # type: ignore[attr-defined]
# a trial's start or end (parameters, attributes, state) in one transaction (`optuna_writes.one_write`)
ResilientRDBStorage.write_held = _with_retry(optuna_rdb.rdb_write_held)  # type: ignore[attr-defined]
# a refill's new trials in one transaction (`optuna_writes.create_trials`)
ResilientRDBStorage.create_trials = _with_retry(optuna_rdb.rdb_create_trials)  # type: ignore[attr-defined]
ResilientRDBStorage.hand_back = _with_retry(optuna_rdb.rdb_hand_back)  # type: ignore[attr-defined]


@functools.cache
def resilient_storage() -> type[ResilientRDBStorage]:
    """ResilientRDBStorage, its RDBStorage calls wrapped in the retry on first use (importing
    this module changes nothing): the public API, the private calls Optuna's own cache makes on
    its backend, and the stale-trial query, filtered by `stale_trial_ids` (`optuna_seam`)."""
    cls, base = ResilientRDBStorage, optuna.storages.RDBStorage
    for name, member in vars(base).items():
        if (inspect.isfunction(member) and name not in vars(cls)
                and (not name.startswith("_") or name in optuna_seam.CACHED_STORAGE_CALLS)):
            setattr(cls, name, _with_retry(member))
    stale_query = _with_retry(getattr(base, optuna_seam.STALE_TRIALS_QUERY))

    def stale(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(stale_query(self, study_id))

    setattr(cls, optuna_seam.STALE_TRIALS_QUERY, stale)
    return cls


def open_storage(url: str | None = None, heartbeat: int | None = None,
                 stale_callback: Callable | None = None,
                 patience: float | None = None, create: bool = True) -> optuna.storages.BaseStorage:
    """Journal file for a plain path, RDBStorage (heartbeats, retries) for a SQLAlchemy URL;
    `create=False`: a database without Optuna's tables is not given them (a reader's open)."""
    url = storage_url(url)
    if is_file(url):
        return JournalStorage(JournalFileBackend(url))
    if url.startswith("grpc://"):
        # Optuna's gRPC storage proxy (`search storage-proxy`) in front of one database, for
        # fleets too large for one connection pool per worker
        host, _, port = url[len("grpc://"):].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--storage {url}: expected grpc://HOST:PORT")
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    kwargs: dict[str, Any] = {} if create else {"skip_table_creation": True}
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat, grace_period=heartbeat * 3,
                      heartbeat_stale_trial_callback=stale_callback)
    for attempt in range(6):
        try:
            return resilient_storage()(url, engine_kwargs={"pool_pre_ping": True},
                                       patience=patience, **kwargs)
        except Exception as exc:
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            # processes opening a fresh database together race to create Optuna's tables;
            # the losers see the winner's tables after a moment
            racing = "duplicate key" in reason or "already exists" in reason
            if not racing or attempt == 5:
                raise UserError(f"cannot open storage {redact(url)}: {reason}") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def wait_for_attr(study: optuna.Study, key: str, timeout: float = 60.0) -> Any:
    """A study attribute its creator (another process, maybe another machine) is about to set."""
    deadline = time.monotonic() + timeout
    while key not in (attrs := study.user_attrs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return attrs.get(key)
