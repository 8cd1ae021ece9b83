"""Where studies live: an Optuna journal file by default, any SQLAlchemy URL otherwise.

The journal file (`search-journal.log` in the working directory) is shared safely by several
processes through file locks. `--storage` or $SEARCH_STORAGE takes a URL (PostgreSQL for many
machines); passwords never appear in messages (`redact`).
"""

from __future__ import annotations

import os
import time
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


def open_storage(url: str | None = None, heartbeat: int | None = None,
                 max_retry: int = 0) -> optuna.storages.BaseStorage:
    """Journal file for a plain path, RDBStorage (with heartbeats) for a SQLAlchemy URL."""
    url = storage_url(url)
    if "://" not in url:
        return JournalStorage(JournalFileBackend(url))
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=heartbeat * 3,
                      failed_trial_callback=optuna.storages.RetryFailedTrialCallback(
                          max_retry=max_retry, inherit_intermediate_values=True))
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
        except Exception as exc:
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            # processes opening a fresh database together race to create Optuna's tables;
            # the losers see the winner's tables after a moment
            racing = "duplicate key" in reason or "already exists" in reason
            if not racing or attempt == 5:
                raise UserError(f"cannot open storage {redact(url)}: {reason}") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")
