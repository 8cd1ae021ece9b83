"""What every launcher is: it takes a run's checked settings and starts `workers` workers
(`search.worker.run.run_worker`) on the study, somewhere. A launcher is one class here with
`check` (refuse what cannot work, before anything exists) and `launch` (the exit status)."""

from __future__ import annotations

from typing import Protocol

import optuna

from search.errors import EXIT_FAILED, StorageUnavailable, UserError
from search.study.lifecycle import leave_study
from search.tracking.client import Tracker
from search.ui.progress import Progress


class WorkersGaveUp(UserError):
    """Workers kept dying (or stopped on an error): the command ends without its full count."""

    exit_code = EXIT_FAILED


class Launcher(Protocol):
    def check(self, settings) -> None:
        """Raises UserError (one line) for settings this launcher cannot run."""

    def launch(self, settings, workers: int) -> int:
        """Opens the study and its parent run, starts the workers; returns the exit status."""


def leave(study: optuna.Study, tracker: Tracker, parent: str, progress: Progress | None,
          status: str) -> None:
    """The progress's last refresh, then the command's last word on the parent run
    (`leave_study`); a silent storage leaves both as they are."""
    try:
        if progress is not None:
            progress.close()
    except StorageUnavailable:
        return
    leave_study(study, tracker, parent, status)
