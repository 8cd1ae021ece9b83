"""What a command says on stderr: `say` for our one-line messages, `redact` so that no password
is ever said, and quiet libraries (our bars and lines replace Optuna's and MLflow's chatter)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import optuna

from search.errors import Interrupted, UserError


def say(line: str, who: str = "search") -> None:
    """One line on stderr, `search: ...` (or `search run: ...`), written at once; above a tqdm
    bar when one is drawn, so the bar is not torn."""
    from tqdm import tqdm

    tqdm.write(f"{who}: {line}", file=sys.stderr)
    sys.stderr.flush()


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    if "://" not in url:  # a journal file
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://***"


class _NoExpectedTracebacks:
    """Optuna logs a failed trial with its traceback; for the failures we expect and explain in
    one line (divergence, a stop, an impossible combination) keep just Optuna's line."""

    def filter(self, record) -> bool:
        from trainer.errors import ConfigError

        if record.exc_info and record.exc_info[0] is not None:
            from trainer.errors import DataError
            from trainer.loop import Diverged

            if issubclass(record.exc_info[0], Diverged | Interrupted | ConfigError | DataError
                          | UserError | KeyboardInterrupt):
                record.exc_info, record.exc_text = None, None
        return True


def quiet_libraries() -> None:
    """Our bars and one-line messages replace Optuna's and MLflow's INFO chatter."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    # our worker loop asks and tells itself, with a heartbeat thread per trial, as optimize does
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    # a retry restarted from epoch 0 (its checkpoint unreadable) reports the inherited epochs again
    warnings.filterwarnings("ignore", message="The reported value is ignored because")
    optuna_logger = logging.getLogger("optuna")
    if not any(isinstance(f, _NoExpectedTracebacks) for f in optuna_logger.filters):
        for handler in optuna_logger.handlers:
            handler.addFilter(_NoExpectedTracebacks())
        optuna_logger.addFilter(_NoExpectedTracebacks())
    # MLflow configures its loggers when it is imported (later, lazily): it reads this then
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
