"""Where studies live: an Optuna journal file by default, any SQLAlchemy URL otherwise.

The journal file (`search-journal.log` in the working directory) is shared safely by several
processes through file locks. `--storage` or $SEARCH_STORAGE takes a URL (PostgreSQL for many
machines), opened as `optuna_seam.resilient`'s storage that rides out outages; passwords
never appear in messages (`search.logs.redact`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from search.errors import UserError
from search.logs import redact
from search.optuna_seam.resilient import resilient_storage

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


def storage_url(url: str | None) -> str:
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


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
