"""The local launcher: `--workers N` processes on this machine, supervised.

Each worker is spawned (a clean torch per process), opens the storage itself and runs its share
of `--n-trials`; with several GPUs they are assigned round-robin, on the CPU the cores are
split. The parent supervises them (`Supervisor`: a dead worker is replaced, its trials re-queued
at once, signals relayed), watches the storage and draws the progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import time

import optuna

from search import defaults
from search.errors import EXIT_OK, EXIT_STORAGE_GONE, EXIT_USAGE, StorageUnavailable, UserError
from search.inputs.settings import RunSettings
from search.launch.base import Launcher, WorkersGaveUp
from search.logs import say
from search.study.budget import counted, room
from search.study.recovery import STOP, RetryDeadTrial, reap_worker
from search.ui.progress import print_summary
from trainer.errors import ConfigError, DataError


def _worker_entry(settings: RunSettings, index: int, n_trials: int | None, threads: int | None,
                  timeout: float | None, stop, parent_pid: int) -> None:
    """A spawned worker. Ctrl-C reaches the parent, which relays it as `stop`; SIGTERM to the
    worker itself, its parent's stop, or its parent gone all stop it after the epoch."""
    from search.worker.run import run_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    STOP.follow(stop, parent_pid)
    settings = dataclasses.replace(settings, timeout=timeout)
    try:
        run_worker(settings, index, n_trials, threads, signals=(signal.SIGTERM,))
    except StorageUnavailable as exc:
        say(f"worker {index}: {exc}", "search run")
        sys.exit(EXIT_STORAGE_GONE)
    except (UserError, ConfigError, DataError) as exc:
        say(f"worker {index}: error: {exc}", "search run")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(STOP.exit_code)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclasses.dataclass
class WorkerPlace:
    """One of the N worker places: its share of trials and the processes that held it."""

    index: int
    share: int | None
    proc: mp.process.BaseProcess | None = None
    pids: set[int] = dataclasses.field(default_factory=set)
    strikes: int = 0  # deaths in a row without a trial finished in between
    finished: int = 0
    ended: bool = False
    problem: str | None = None  # why this slot gave up, for the final message


class Supervisor:
    """`--workers N`: starts N spawned workers and keeps them going. A worker that dies is
    reported on stderr, its trials failed and re-queued at once, and a replacement takes over
    the rest of its share, up to `max_restarts` deaths in a row without a finished trial.
    SIGINT/SIGTERM to the parent stop every worker after its epoch; a second one stops at once."""

    def __init__(self, settings: RunSettings, study: optuna.Study, workers: int, max_restarts: int,
                 pids: set[int] | None = None):
        from search.worker.run import shares

        self.settings, self.study, self.max_restarts = settings, study, max_restarts
        self.pids = pids if pids is not None else set()  # every worker process it started
        self.handler = RetryDeadTrial(settings.max_retry, settings.mlflow_uri)
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.Event()
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.start_time = time.monotonic()
        self.slots = [WorkerPlace(i, n) for i, n in enumerate(shares(settings.n_trials, workers))]

    def _launch(self, slot: WorkerPlace, n_trials: int | None) -> None:
        timeout = self.settings.timeout
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - self.start_time))
        slot.proc = self.ctx.Process(target=_worker_entry, name=f"search-worker-{slot.index}",
                                     args=(self.settings, slot.index, n_trials, self.threads,
                                           timeout, self.stop, os.getpid()))
        slot.proc.start()
        slot.pids.add(slot.proc.pid)
        self.pids.add(slot.proc.pid)

    def _on_exit(self, slot: WorkerPlace) -> None:
        from search.worker.run import finished_by

        proc = slot.proc
        code = proc.exitcode
        if code == 0 or (STOP.requested and code in (130, 143)):
            slot.ended = True
            return
        if code == EXIT_STORAGE_GONE:  # it said why; no storage to reap with, nothing to replace
            slot.ended, slot.problem = True, f"worker {slot.index} lost the storage"
            return
        reaped = reap_worker(self.study, proc.pid, self.handler)
        if STOP.requested:  # it died while stopping: its trials are re-queued, nothing to replace
            slot.ended = True
            return
        if code == 2:  # it printed its error: a bad setting fails every replacement alike
            slot.ended, slot.problem = True, f"worker {slot.index} stopped on an error"
            return
        done = finished_by(self.study, slot.pids)
        slot.strikes = 1 if done > slot.finished else slot.strikes + 1
        slot.finished = done
        left = None if slot.share is None else slot.share - done
        trials = (f"trial {', '.join(map(str, reaped))} re-queued" if reaped
                  else "no trial in flight")
        what = f"worker {slot.index} (pid {proc.pid}) {describe_exit(code)}; {trials}"
        timed_out = (self.settings.timeout is not None
                     and time.monotonic() - self.start_time >= self.settings.timeout)
        total = self.settings.study_total
        if (left == 0 and total is None) or timed_out or not room(self.study, total):
            say(f"{what}; its share is done", "search run")
            slot.ended = True
        elif slot.strikes > self.max_restarts:
            say(f"{what}; not replaced: {slot.strikes} deaths in a row without a "
                "finished trial", "search run")
            slot.ended = True
            slot.problem = (f"worker {slot.index} died {slot.strikes} times in a row without "
                            f"finishing a trial (last: {describe_exit(code)})")
        else:
            say(f"{what}; starting a replacement ({slot.strikes} of "
                f"{self.max_restarts} in a row)", "search run")
            self._launch(slot, left if total is None else None)  # a total bounds it instead

    def run(self) -> None:
        for slot in self.slots:
            self._launch(slot, slot.share)
        try:
            while not all(s.ended for s in self.slots):
                time.sleep(0.5)
                if STOP.requested:
                    self.stop.set()
                for slot in self.slots:
                    if not slot.ended and not slot.proc.is_alive():
                        slot.proc.join()
                        self._on_exit(slot)
        except KeyboardInterrupt:  # a second signal: stop now, keep what the checkpoints hold
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            started = [s for s in self.slots if s.proc is not None]
            for slot in started:
                if slot.proc.is_alive():
                    slot.proc.kill()
            for slot in started:
                slot.proc.join()
                reap_worker(self.study, slot.proc.pid, self.handler,
                            "stopped at once by a second signal; resumes from its last "
                            "checkpoint", "KILLED")
            raise
        if STOP.requested:
            raise KeyboardInterrupt
        problems = [s for s in self.slots if s.problem]
        total = self.settings.study_total
        if problems:
            missing = max(0, total - counted(self.study.get_trials(deepcopy=False))) \
                if total is not None else 0
            count = (f"{missing} of the study's {total} trials did not run" if total is not None
                     else "the study ended early")
            raise WorkersGaveUp(f"{count}: {'; '.join(s.problem for s in problems)}")


@dataclasses.dataclass
class LocalJob:
    """This command's workers: the study, their settings, how many, and their pids."""

    study: optuna.Study
    settings: RunSettings
    workers: int
    pids: set[int]


class LocalLauncher(Launcher):
    """`search run` without another launcher: the workers are processes on this machine."""

    name = "local"

    def __init__(self, max_restarts: int = defaults.MAX_RESTARTS):
        self.max_restarts = max_restarts
        self.ahead = None  # one worker's sampling-ahead child (`prepare`)

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-restarts", type=int, default=defaults.MAX_RESTARTS,
                            help="a dead worker is replaced until it dies this many times in a row "
                            f"without finishing a trial (default {defaults.MAX_RESTARTS})")

    def prepare(self, settings: RunSettings, workers: int) -> RunSettings:
        """One worker here: its sampling-ahead child starts up while the study opens."""
        from search.worker.run import start_sample_ahead, worker_device

        self.ahead = None
        if workers == 1:
            self.ahead = start_sample_ahead(settings, settings.load_space(),
                                            worker_device(0, settings.overrides), settings.n_trials)
        return settings

    def abandon(self) -> None:
        if self.ahead is not None:
            self.ahead.close()

    def start(self, study: optuna.Study, tracker, parent: str, settings: RunSettings,
              workers: int) -> LocalJob:
        # the Supervisor adds its workers' pids: their trials are this command's
        return LocalJob(study, settings, workers, {os.getpid()})

    def pids(self, job: LocalJob) -> set[int]:
        return job.pids

    def wait(self, job: LocalJob) -> None:
        if job.workers == 1:
            from search.worker.run import run_worker

            run_worker(job.settings, 0, job.settings.n_trials, None, ahead=self.ahead)
            return
        # like a worker's: first signal stops after the epoch, a second stops at once;
        # a SIGINT ignored by whoever started us (`cmd &` in a script) stays ignored
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        STOP.install((signal.SIGTERM,) if ignored else (signal.SIGINT, signal.SIGTERM))
        Supervisor(job.settings, job.study, job.workers, self.max_restarts, job.pids).run()

    def ended(self, study: optuna.Study, settings: RunSettings, job: LocalJob) -> int:
        from search.worker.run import finished_by

        total = settings.study_total
        if total and finished_by(study, job.pids) == 0 and not room(study, total):
            say(f"study {study.study_name} already holds its {total} trials (--n-trials is the "
                "study's total); nothing to run: --add-trials K runs K more", "search run")
        print_summary(study)
        return EXIT_OK
