"""Where studies live: an Optuna journal file by default, any SQLAlchemy URL otherwise.

The journal file (`search-journal.log` in the working directory) is shared safely by several
processes through file locks. `--storage` or $SEARCH_STORAGE takes a URL (PostgreSQL for many
machines); passwords never appear in messages (`redact`).
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from search.errors import UserError

DEFAULT_STORAGE = "search-journal.log"
STORAGE_ENV = "SEARCH_STORAGE"


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***"


def storage_url(url: str | None) -> str:
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


_TRANSIENT = ("server closed the connection", "connection refused", "could not connect",
              "terminating connection", "connection already closed", "the database system is",
              "ssl connection has been closed", "connection reset", "no connection to the server")


def _transient(exc: BaseException | None) -> bool:
    """A lost or refused database connection (a restart, a network blip), worth retrying;
    Optuna wraps such errors (StorageInternalError), so the cause chain is searched."""
    from sqlalchemy import exc as sa_exc

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            return True
        text = str(exc).lower()
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) and any(
                t in text for t in _TRANSIENT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose calls retry with backoff while the database is unreachable, so a
    PostgreSQL restart in the middle of a study pauses the workers instead of failing trials."""

    retry_seconds = 120.0


def _with_retry(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        delay, waited = 0.5, 0.0
        while True:
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                if not _transient(exc) or waited >= self.retry_seconds:
                    raise
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 8.0)

    return call


for _name, _member in vars(optuna.storages.RDBStorage).items():
    if inspect.isfunction(_member) and not _name.startswith("_"):
        setattr(ResilientRDBStorage, _name, _with_retry(_member))


def open_storage(url: str | None = None, heartbeat: int | None = None,
                 stale_callback: Callable | None = None) -> optuna.storages.BaseStorage:
    """Journal file for a plain path, RDBStorage (heartbeats, retries) for a SQLAlchemy URL."""
    url = storage_url(url)
    if "://" not in url:
        return JournalStorage(JournalFileBackend(url))
    if url.startswith("grpc://"):
        # Optuna's gRPC storage proxy (`search storage-proxy`) in front of one database, for
        # fleets too large for one connection pool per worker
        host, _, port = url[len("grpc://"):].rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--storage {url}: expected grpc://HOST:PORT")
        return optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=heartbeat * 3,
                      heartbeat_stale_trial_callback=stale_callback)
    for attempt in range(6):
        try:
            return ResilientRDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
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
