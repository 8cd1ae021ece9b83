"""What every launcher is, and the parts of a run's life they share.

A launcher is one class: it says how workers start, are watched and stop, and brings its own
flags, study-file block, task identity (to resume a task's share after a restart), status
fields and clean-up paths. The rest of a run's life -- the study and its parent run opened,
the budget resolved, the settings handed to workers, a worker's share run, the parent run left
-- is written once, here and in `search.worker.run`. Built-in launchers are `local` and `slurm`;
another is found through the entry-point group `search.launchers` (`search.launch.plugins`).

This module imports nothing heavy: every launcher class is loaded to build the command's flags.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from search.errors import EXIT_FAILED, EXIT_OK, StorageUnavailable, UserError


class WorkersGaveUp(UserError):
    """Workers kept dying (or stopped on an error): the command ends without its full count."""

    exit_code = EXIT_FAILED


class Launcher(abc.ABC):
    """A launcher. Subclasses set `name`, write `start` and `wait`, and override what else they
    need; `launch` is the run's life around them."""

    name: ClassVar[str] = ""
    block: ClassVar[str | None] = None  # its study file's block (`slurm:`), checked by `chosen`
    task_attr: ClassVar[str | None] = None  # the trial attribute naming the task that ran it
    study_attr: ClassVar[str | None] = None  # the study attribute naming its job (status, clean)
    trains_here: ClassVar[bool] = True  # its workers use this machine's devices (checked first)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Adds its flags to `search run` (none by default)."""
        return None

    @classmethod
    def chosen(cls, args: argparse.Namespace, block: dict | None, where: str) -> Launcher | None:
        """This launcher, configured, when the flags or the study file's block ask for it."""
        return None

    def check(self, settings: Any) -> None:
        """Raises UserError (one line) for settings it cannot run, before anything exists;
        accepts any by default."""
        return None

    def launch(self, settings: Any, workers: int) -> int:
        """The run's life, the same for every launcher: the study and its parent run opened and
        the budget resolved (`open_launch`), the workers started (`start`), followed with the
        progress lines until they end (`wait`; unless `follows` says no), the parent run left
        FINISHED, FAILED or KILLED, and the exit status (`ended`). Ctrl-C while following:
        `interrupted` answers (an exit status, or None to stop the command as one)."""
        from search.ui.progress import Progress

        settings = self.prepare(settings, workers)
        try:
            study, tracker, parent, epochs, settings = open_launch(settings, workers)
        except BaseException:
            self.abandon()
            raise
        job = self.start(study, tracker, parent, settings, workers)
        if not self.follows(job):
            return EXIT_OK
        progress = Progress(study, settings.study_total, epochs, pids=self.pids(job))
        progress.watch()
        status = "FAILED"
        try:
            self.wait(job)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            code = self.interrupted(job)
            if code is None:
                raise
            return code
        finally:
            leave(study, tracker, parent, progress, status)
        return self.ended(study, settings, job)

    def prepare(self, settings: Any, workers: int) -> Any:
        """The settings as this launcher runs them, before the study opens (unchanged by default)."""
        return settings

    def abandon(self) -> None:
        """Undoes `prepare` when the study could not be opened."""
        return None

    @abc.abstractmethod
    def start(self, study: Any, tracker: Any, parent: str, settings: Any, workers: int) -> Any:
        """Starts the workers on the opened study; returns what `wait` and `ended` need (a job)."""

    def follows(self, job: Any) -> bool:
        """Whether this command follows the workers until they end (True by default)."""
        return True

    def pids(self, job: Any) -> set[int] | None:
        """This machine's processes whose trials the progress lines count as this command's."""
        return None

    @abc.abstractmethod
    def wait(self, job: Any) -> None:
        """Returns when the workers have ended; raises what made them end early."""

    def interrupted(self, job: Any) -> int | None:
        """Ctrl-C while following: the exit status after stopping the workers, or None."""
        return None

    def ended(self, study: Any, settings: Any, job: Any) -> int:
        """The exit status once the workers have ended and the parent run is left."""
        return EXIT_OK

    @classmethod
    def task(cls) -> tuple[str, int, int | None] | None:
        """In a worker it started (`search worker --spec FILE`): (task id, the task's index
        among the workers, CPU threads or None); None elsewhere."""
        return None

    @classmethod
    def requeue(cls) -> bool:
        """A worker stopped by a signal asks to run again (True when it will)."""
        return False

    @classmethod
    def others_running(cls, study: Any) -> int:
        """How many other workers of the study's job still run (the last one closes the run)."""
        return 0

    @classmethod
    def status(cls, study: Any) -> dict[str, Any] | None:
        """Its fields in `search status --json` for a study it launched; None for others."""
        return None

    @classmethod
    def status_line(cls, fields: dict[str, Any]) -> str:
        """Those fields in `search status`'s line."""
        return ""

    @classmethod
    def files(cls, study_name: str) -> list[Path]:
        """What it leaves per study in the working directory (`search clean` removes them)."""
        return []


def write_spec(settings: Any, workers: int, launcher: str, folder: Path) -> Path:
    """The run's settings as a JSON file its workers read (`search worker --spec FILE`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"spec-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    path.write_text(json.dumps({"spec": dataclasses.asdict(settings), "workers": workers,
                                "launcher": launcher}, indent=1))
    return path


def read_spec(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        data["spec"], data["workers"] = dict(data["spec"]), int(data["workers"])
        return data
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--spec {path}: cannot read the worker's settings ({exc})") from None


def open_launch(settings: Any, workers: int) -> tuple[Any, Any, str, int, Any]:
    """Every launch's start: the study created or resumed with its parent MLflow run
    (`open_run`), then its budget resolved into the settings workers receive. Returns the study,
    its tracker, the parent run's id, the epochs per trial and those settings."""
    from search.study.lifecycle import open_run
    from search.worker.run import resolve_budget

    study, tracker, parent, epochs = open_run(settings, workers)
    return study, tracker, parent, epochs, resolve_budget(study, settings)


def leave(study: Any, tracker: Any, parent: str, progress: Any, status: str) -> None:
    """The progress's last refresh, then the command's last word on the parent run
    (`leave_study`); a silent storage leaves both as they are."""
    from search.study.lifecycle import leave_study

    try:
        if progress is not None:
            progress.close()
    except StorageUnavailable:
        return
    leave_study(study, tracker, parent, status)
