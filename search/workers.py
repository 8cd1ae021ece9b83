"""Worker processes on one study, and the terminal progress that watches them.

`--workers N` starts N processes (spawned, so each has a clean torch); each opens the storage
itself and runs its share of `--n-trials`. With several GPUs they are assigned round-robin; on
the CPU the cores are split between them. The parent supervises them (`Supervisor`: dead
workers replaced, their trials re-queued at once, signals relayed), watches the storage and
draws the progress.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
from tqdm import tqdm

from search.checkpoints import CheckpointStore
from search.constraints import feasible
from search.errors import StorageUnavailable, UserError
from search.logs import quiet_libraries
from search.objectives import best_first, epochs_run, primary, study_objectives
from search.packed import run_trials
from search.recovery import (
    HOST,
    STOP,
    RetryDeadTrial,
    reap_dead_local_trials,
    reap_worker,
    retried_numbers,
)
from search.storage import redact, wait_for_attr
from search.study import RunSpec, TrialRunner, enqueue_fixed_trials, open_study
from search.tracking import PARENT_ATTR, Tracker
from trainer.config import ConfigError
from trainer.data import DataError

State = optuna.trial.TrialState
STORAGE_GONE = 75  # a worker's exit status when the storage stayed silent past its patience


def shares(n_trials: int | None, workers: int) -> list[int | None]:
    """Splits the command's trial budget exactly: trials in total, however many workers."""
    if n_trials is None:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


def resolve_auto_pack(runner: TrialRunner, n_trials: int | None) -> int:
    """`--pack auto` on this worker's device, for the largest batch its space can draw."""
    from search.packing import auto_pack
    from trainer.runtime import resolve_device

    fixed = {**runner.space.fixed, **runner.overrides}
    batch = next((p for p in runner.space.params if p.name == "batch_size"), None)
    batches = (batch.values() or [batch.high]) if batch is not None else [fixed.get("batch_size", 64)]
    workers = next((p for p in runner.space.params if p.name == "local_workers"), None)
    local = (max(workers.values() or [workers.high]) if workers is not None
             else fixed.get("local_workers", 1))
    device = str(resolve_device(str(fixed.get("device", "auto"))))
    choice = auto_pack(device, int(max(batches)), int(local), n_trials)
    if choice.pack > 1:  # on a CPU auto is 1, as without packing: nothing to say
        print(f"search: {choice.line}", file=sys.stderr, flush=True)
    return choice.pack


def worker_device(index: int, overrides: dict) -> dict:
    """Per-worker device and threads: GPUs round-robin, else the CPU cores split."""
    out = dict(overrides)
    if "device" in out and out["device"] not in ("auto", "cuda"):
        return out
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:
        gpus = 0
    if gpus > 1:
        out["device"] = f"cuda:{index % gpus}"
    return out


def run_worker(spec: RunSpec, index: int, n_trials: int | None, threads: int | None,
               signals: tuple = (signal.SIGINT, signal.SIGTERM),
               slurm_task: str | None = None) -> optuna.Study:
    """One worker: open the study, run its share of trials. Trial failures (divergence, an
    impossible combination) fail that trial only; anything else ends the worker. A Slurm array
    task (`slurm_task`) that runs again after a requeue runs only what its earlier runs left."""
    quiet_libraries()
    if threads:
        import torch

        torch.set_num_threads(threads)
    space = spec.load_space()
    study, _ = open_study(spec, space, worker=index)
    if slurm_task is not None and n_trials is not None:
        n_trials = max(0, n_trials - finished_by(study, slurm_task=slurm_task))
    tracker = Tracker(spec.mlflow_uri, spec.study_name, spec.command)
    parent = wait_for_attr(study, PARENT_ATTR)
    handler = RetryDeadTrial(spec.max_retry, spec.mlflow_uri)
    # the journal file and the gRPC proxy have no heartbeat: reap trials of dead processes on
    # this machine instead
    no_heartbeat = "://" not in spec.storage or spec.storage.startswith("grpc://")
    reaper = (lambda s: reap_dead_local_trials(s, handler)) if no_heartbeat else None
    runner = TrialRunner(space, worker_device(index, spec.overrides), tracker, parent,
                         CheckpointStore(spec.checkpoint_dir, spec.study_name,
                                         spec.keep_checkpoints), reaper, spec.objectives,
                         spec.constraints)
    if reaper is not None:
        reaper(study)
    if n_trials == 0:  # `--n-trials 0`: only tidy up (stale trials failed and re-queued)
        optuna.storages.fail_stale_trials(study)
        return study
    STOP.install(signals)
    try:
        pack = spec.pack if spec.pack != "auto" else resolve_auto_pack(runner, n_trials)
        run_trials(study, runner, pack, n_trials, spec.timeout, handler, spec.stop_within,
                   spec.ramp)
        if STOP.raised:  # stopped between trials: nothing to re-queue, still an interruption
            raise KeyboardInterrupt
    finally:
        tracker.drain()
    return study


def _worker_entry(spec: RunSpec, index: int, n_trials: int | None, threads: int | None,
                  timeout: float | None, stop, parent_pid: int) -> None:
    """A spawned worker. Ctrl-C reaches the parent, which relays it as `stop`; SIGTERM to the
    worker itself, its parent's stop, or its parent gone all stop it after the epoch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    STOP.follow(stop, parent_pid)
    spec = dataclasses.replace(spec, timeout=timeout)
    try:
        run_worker(spec, index, n_trials, threads, signals=(signal.SIGTERM,))
    except StorageUnavailable as exc:
        print(f"search run: worker {index}: {exc}", file=sys.stderr)
        sys.exit(STORAGE_GONE)
    except (UserError, ConfigError, DataError) as exc:
        print(f"search run: worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(STOP.exit_code)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def finished_by(study: optuna.Study, pids: set[int] | None = None,
                slurm_task: str | None = None) -> int:
    """Trials that processes `pids` on this host (or one Slurm array task, over its requeues;
    or, with neither, anyone) finished; retried attempts not counted."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)

    def by(t: optuna.trial.FrozenTrial) -> bool:
        if slurm_task is not None:
            return t.user_attrs.get("slurm_task") == slurm_task
        if pids is None:
            return True
        return t.user_attrs.get("worker_host") == HOST and t.user_attrs.get("worker_pid") in pids

    return sum(t.state.is_finished() and t.number not in retried and by(t) for t in trials)


@dataclasses.dataclass
class _Slot:
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

    def __init__(self, spec: RunSpec, study: optuna.Study, workers: int, max_restarts: int,
                 pids: set[int] | None = None):
        self.spec, self.study, self.max_restarts = spec, study, max_restarts
        self.pids = pids if pids is not None else set()  # every worker process it started
        self.handler = RetryDeadTrial(spec.max_retry, spec.mlflow_uri)
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.Event()
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.start_time = time.monotonic()
        self.slots = [_Slot(i, n) for i, n in enumerate(shares(spec.n_trials, workers))]

    def _launch(self, slot: _Slot, n_trials: int | None) -> None:
        timeout = self.spec.timeout
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - self.start_time))
        slot.proc = self.ctx.Process(target=_worker_entry, name=f"search-worker-{slot.index}",
                                     args=(self.spec, slot.index, n_trials, self.threads,
                                           timeout, self.stop, os.getpid()))
        slot.proc.start()
        slot.pids.add(slot.proc.pid)
        self.pids.add(slot.proc.pid)

    def _say(self, line: str) -> None:
        tqdm.write(f"search run: {line}", file=sys.stderr)

    def _on_exit(self, slot: _Slot) -> None:
        proc = slot.proc
        code = proc.exitcode
        if code == 0 or (STOP.raised and code in (130, 143)):
            slot.ended = True
            return
        if code == STORAGE_GONE:  # it said why; no storage to reap with, nothing to replace
            slot.ended, slot.problem = True, f"worker {slot.index} lost the storage"
            return
        reaped = reap_worker(self.study, proc.pid, self.handler)
        if STOP.raised:  # it died while stopping: its trials are re-queued, nothing to replace
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
        timed_out = (self.spec.timeout is not None
                     and time.monotonic() - self.start_time >= self.spec.timeout)
        if left == 0 or timed_out:
            self._say(f"{what}; its share is done")
            slot.ended = True
        elif slot.strikes > self.max_restarts:
            self._say(f"{what}; not replaced: {slot.strikes} deaths in a row without a "
                      "finished trial")
            slot.ended = True
            slot.problem = (f"worker {slot.index} died {slot.strikes} times in a row without "
                            f"finishing a trial (last: {describe_exit(code)})")
        else:
            self._say(f"{what}; starting a replacement ({slot.strikes} of "
                      f"{self.max_restarts} in a row)")
            self._launch(slot, left)

    def run(self) -> None:
        for slot in self.slots:
            self._launch(slot, slot.share)
        try:
            while not all(s.ended for s in self.slots):
                time.sleep(0.5)
                if STOP.raised:
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
        if STOP.raised:
            raise KeyboardInterrupt
        problems = [s for s in self.slots if s.problem]
        if problems:
            missing = sum(max(0, s.share - s.finished) for s in problems if s.share is not None)
            count = (f"{missing} of {self.spec.n_trials} trials did not run"
                     if self.spec.n_trials is not None else "the study ended early")
            raise WorkersGaveUp(f"{count}: {'; '.join(s.problem for s in problems)}")


class WorkersGaveUp(UserError):
    """Workers kept dying (or stopped on an error): the command ends without its full count."""

    exit_code = 1


def _short(v) -> str:
    if not isinstance(v, float):
        return str(v)
    return f"{v:.2e}".replace("e-0", "e-") if 0 < abs(v) < 1e-3 else f"{v:.3g}"


def short_params(params: dict) -> str:
    """A trial's sampled values, short: `lr=3.42e-4 batch_size=128 augment=final`."""
    return " ".join(f"{k}={_short(v)}" for k, v in params.items())


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else (
        f"{seconds / 60:.0f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h")


def finished_line(t: optuna.trial.FrozenTrial, names: list[str], count: str,
                  best: str | None) -> str:
    """One line per finished trial in a log (at most ~160 characters for the shipped spaces;
    the study's name is on the status lines)."""
    value = (" " + " ".join(f"{n} {v:.4g}" for n, v in zip(names, t.values, strict=True))
             if t.values else "")
    secs = t.duration.total_seconds() if t.duration else 0.0
    # a complete trial shows its values; the others say their state instead
    state = "" if t.state == State.COMPLETE else f" {t.state.name.lower()}"
    ran = "" if t.state == State.COMPLETE else f"{epochs_run(t)} ep, "  # complete: all of them
    return (f"trial {t.number}{state}{value} ({ran}{_duration(secs)}): {short_params(t.params)}; {count}"
            + (f", {best}" if best is not None else ""))


class Progress:
    """What a study is doing, read from the storage (the same for one worker or many).

    On a terminal: a tqdm bar (finished / pruned / failed, best) and the running trials' epoch,
    accuracy and ETA. Elsewhere (a log file, CI, nohup): one line per finished trial and at most
    one status line a minute, so a log grows with the study, not with the clock."""

    def __init__(self, study: optuna.Study, total: int | None, epochs: int,
                 tty: bool | None = None, quiet_seconds: float = 60.0,
                 pids: set[int] | None = None):
        self.study, self.total, self.epochs = study, total, epochs
        self.names = study_objectives(study)
        self.marks: dict[int, tuple[int, datetime.datetime]] = {}  # trial -> (epoch, seen at)
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.baseline = set(self.seen)
        # this command's processes: other commands on the study finish trials too, and the
        # count is of this command's --n-trials (None: every trial of the study counts)
        self.pids = pids
        self.quiet_seconds, self.last_line = quiet_seconds, time.monotonic()
        self.bar = (tqdm(total=total, desc=f"study {study.study_name}", unit="trial",
                         file=sys.stderr, dynamic_ncols=True) if self.tty else None)
        self.stop = threading.Event()

    def _running(self, t: optuna.trial.FrozenTrial) -> str | None:
        if not (t.intermediate_values and t.datetime_start):
            return None
        step = max(t.intermediate_values)
        now = datetime.datetime.now()
        seen_step, seen_at = self.marks.get(t.number, (None, now))
        if seen_step != step:  # first sight of this epoch: time per epoch up to here
            self.marks[t.number] = (step, now)
            seen_at = now
        # resumed trials inherit earlier epochs: time only those run since the start
        ran = max(1, step - int(t.user_attrs.get("resumed_from_epoch", 0)))
        per_epoch = (seen_at - t.datetime_start).total_seconds() / ran
        # counts down through an epoch instead of climbing while the epoch runs
        eta = max(0.0, per_epoch * (self.epochs - step) - (now - seen_at).total_seconds())
        return f"ep {step}/{self.epochs} acc {t.intermediate_values[step]:.3f} eta {eta:.0f}s"

    def _mine(self, t: optuna.trial.FrozenTrial) -> bool:
        return self.pids is None or (t.user_attrs.get("worker_host") == HOST
                                     and t.user_attrs.get("worker_pid") in self.pids)

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        retried = retried_numbers(trials)
        done = [t for t in trials if t.state.is_finished() and t.number not in retried
                and t.number not in self.baseline and self._mine(t)]
        counts = {s: sum(t.state == s for t in done) for s in (State.COMPLETE, State.PRUNED,
                                                               State.FAIL)}
        # the best of the feasible trials; a multi-objective study has a front, not a best
        complete = [t for t in trials if t.state == State.COMPLETE and t.values and feasible(t)]
        running = [t for t in trials if t.state == State.RUNNING]
        post = {"complete": counts[State.COMPLETE], "pruned": counts[State.PRUNED],
                "failed": counts[State.FAIL]}
        if complete and len(self.names) > 1:
            post["front"] = str(len(self.study.best_trials))
        elif complete:
            post["best"] = f"{primary(min(complete, key=best_first(self.study))):.4f}"
        best = next((f"{k} {v}" for k, v in post.items() if k in ("best", "front")), None)
        if self.bar is not None:
            for t in running[:2]:
                if (text := self._running(t)) is not None:
                    post[f"#{t.number}"] = text
            self.bar.n = len(done) if self.total is None else min(len(done), self.total)
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
            return
        of = f"/{self.total}" if self.total is not None else ""
        for t in sorted((t for t in done if t.number not in self.seen), key=lambda t: t.number):
            self.seen.add(t.number)
            print(finished_line(t, self.names, f"{len(done)}{of}", best),
                  file=sys.stderr, flush=True)
            self.last_line = time.monotonic()
        if time.monotonic() - self.last_line >= self.quiet_seconds:
            states = ", ".join(f"#{t.number} {self._running(t) or 'starting'}" for t in running)
            print(f"study {self.study.study_name}: {len(done)}{of} finished, {len(running)} "
                  f"running{': ' + states if states else ''}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def watch(self, interval: float = 1.0) -> threading.Thread:
        def loop():
            while not self.stop.wait(interval):
                try:
                    self.refresh()
                except Exception:  # a storage blip must not kill the display
                    pass

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.stop.set()
        try:
            self.refresh()
        finally:
            if self.bar is not None:
                self.bar.close()


def describe_study(spec: RunSpec) -> str:
    """The parent run's description (MLflow renders it as Markdown)."""
    storage = redact(spec.storage)
    flag = "" if storage == "search-journal.log" else f" --storage '{storage}'"
    return (f"Optuna study **{spec.study_name}** ({', '.join(spec.objectives)}; sampler "
            f"{spec.sampler}, pruner {spec.pruner}) stored in `{storage}`. Each nested run is one "
            f"trial.\n\nWatch it live: `search dashboard{flag}` · its table: `search table "
            f"--study {spec.study_name}{flag}` · a report: `search report --study "
            f"{spec.study_name}{flag}`")


def open_run(spec: RunSpec, workers: int) -> tuple[optuna.Study, Tracker, str, int]:
    """Creates or resumes the study and its parent MLflow run (settings, description, dataset,
    fixed trials, table); returns (study, tracker, parent run id, epochs per trial). The same
    for workers started here and for a Slurm job array."""
    space = spec.load_space()
    study, created = open_study(spec, space)
    tracker = Tracker(spec.mlflow_uri, spec.study_name, spec.command)
    settings = spec.settings(workers)
    if created:  # on the study too, short and flat: the dashboard and `optuna studies` show it
        study.set_user_attr("settings", " ".join(f"{k}={v}" for k, v in settings.items()
                                                 if k not in ("storage", "space")))
        study.set_user_attr("mlflow", {"uri": redact(tracker.uri),
                                       "experiment_id": tracker.experiment_id})
    from trainer.config import TrainConfig

    data = {**TrainConfig().to_dict(), **space.fixed, **spec.overrides}
    if created:  # the dashboard shows what the trials learn from, and says when it is a stand-in
        searched = next((p.choices for p in space.params if p.name == "dataset"), None)
        names = searched if searched and "dataset" not in spec.overrides else [data["dataset"]]
        study.set_user_attr("dataset", ", ".join(names) + (
            "" if set(names) == {"cifar100"} else " (not CIFAR-100)"))
    parent = tracker.parent_run(study, space.text, space.hash, created, settings,
                                describe_study(spec), data)
    if tracker.run_url() and created:
        tqdm.write(f"search run: MLflow experiment {tracker.run_url()}", file=sys.stderr)
    enqueue_fixed_trials(study, spec.fixed_trials, created)
    if spec.table and created:
        study.set_user_attr("table", spec.table)
    return study, tracker, parent, int(spec.overrides.get("epochs", space.fixed.get("epochs", 150)))


def run_study(spec: RunSpec, workers: int = 1, max_restarts: int = 3) -> optuna.Study:
    """Creates or resumes the study, then runs `workers` workers on it until their shares of
    `spec.n_trials` (or the timeout) are spent. Returns the study."""
    study, tracker, parent, epochs = open_run(spec, workers)
    pids = {os.getpid()}  # the Supervisor adds its workers'
    progress = Progress(study, spec.n_trials, epochs, pids=pids)
    progress.watch()
    status = "FAILED"
    try:
        if workers == 1:
            run_worker(spec, 0, spec.n_trials, None)
        else:
            # like a worker's: first signal stops after the epoch, a second stops at once;
            # a SIGINT ignored by whoever started us (`cmd &` in a script) stays ignored
            ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            STOP.install((signal.SIGTERM,) if ignored else (signal.SIGINT, signal.SIGTERM))
            Supervisor(spec, study, workers, max_restarts, pids).run()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        leave_study(study, tracker, parent, progress, status)
    return study


def run_slurm_task(spec_path: str) -> int:
    """`search worker --spec FILE`: one task of a `--slurm` job array. Runs its share (what its
    earlier runs left, after a requeue); on SIGTERM (preemption, the time limit, `scancel
    --signal=TERM`) it stops after the epoch, its trials re-queued in Optuna, and requeues its
    own task. The last task to leave closes the study's parent MLflow run."""
    from search import slurm

    quiet_libraries()
    spec, workers = slurm.load_spec(spec_path)
    task = slurm.task_id()
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    threads = int(os.environ["SLURM_CPUS_PER_TASK"]) if os.environ.get("SLURM_CPUS_PER_TASK") \
        else None
    share = shares(spec.n_trials, workers)[index]
    print(f"search worker: task {task or index} of study {spec.study_name} (share "
          f"{share if share is not None else 'until the timeout'}) on {HOST}", file=sys.stderr,
          flush=True)
    try:
        study = run_worker(spec, index, share, threads, signals=(signal.SIGTERM, signal.SIGINT),
                           slurm_task=task)
    except KeyboardInterrupt:
        # `scontrol requeue` has Slurm SIGTERM this very task again: nothing is left to stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        again = slurm.requeue_self()
        print(f"search worker: stopped by {signal.Signals(STOP.signum or 15).name} after its "
              f"epoch; its trials are re-queued" + (f"; task {task} requeued" if again else ""),
              file=sys.stderr, flush=True)
        return 0 if again else STOP.exit_code
    tracker = Tracker(spec.mlflow_uri, spec.study_name, spec.command)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    others = sum(slurm.array_tasks(job).values()) - 1 if job else 0
    done = finished_by(study)
    parent = study.user_attrs.get(PARENT_ATTR)
    # tasks ending together each see the other still listed: the study's count decides too
    if parent and (others <= 0 or (spec.n_trials is not None and done >= spec.n_trials)):
        leave_study(study, tracker, parent, None, "FINISHED")
    return 0


def leave_study(study: optuna.Study, tracker: Tracker, parent: str, progress: Progress | None,
                status: str) -> None:
    """This command's last word on the study's parent run: its summary metrics, and its end
    (FINISHED, KILLED, FAILED) only when no other command still trains a trial of the study —
    the last command to leave closes it. A silent storage leaves it RUNNING: the trials in
    flight resume with the next command."""
    try:
        if progress is not None:
            progress.close()
        trials = study.get_trials(deepcopy=False)
        others = [t.number for t in trials if t.state == State.RUNNING]
    except StorageUnavailable:
        return
    summary: dict = {"n_trials": len(trials)}
    if len(study.directions) == 1:
        complete = [t for t in trials if t.state == State.COMPLETE and feasible(t)]
        if complete:
            summary["best_value"] = primary(min(complete, key=best_first(study)))
    else:
        summary["pareto_front"] = [{"trial": t.number, **dict(zip(
            study_objectives(study), t.values, strict=True))} for t in study.best_trials]
    tracker.finish_parent(parent, summary, None if others else status)
    return study


def submit_study(spec: RunSpec, workers: int, opts) -> int:
    """`search run --slurm`: the study and its parent run as for a local run, then ONE job
    array of `workers` tasks; prints how to follow it and returns (`--slurm-wait` follows it
    with the same progress lines until the array ends; Ctrl-C then cancels the array)."""
    from search import slurm
    from search.checkpoints import DEFAULT_DIR

    # a relative folder means the submitting directory's, which every node must share
    spec = dataclasses.replace(spec, checkpoint_dir=str(
        (Path.cwd() / (spec.checkpoint_dir or DEFAULT_DIR)).absolute()))
    study, tracker, parent, epochs = open_run(spec, workers)
    job = slurm.submit(spec, workers, opts)
    study.set_user_attr(slurm.JOB_ATTR, job)
    tracker.tag(parent, slurm.JOB_ATTR, job)
    storage = redact(spec.storage)
    where = "on its GPU" if opts.gpus_per_worker else "on its CPUs"
    flight = (f"up to {spec.pack} trial(s) in flight" if spec.pack != "auto"
              else "as many trials in flight as its GPU holds (--pack auto)"
              if opts.gpus_per_worker else "one trial at a time (--pack auto on CPUs)")
    lines = [f"submitted Slurm job array {job}: {workers} tasks, each one worker with "
             f"{flight} {where}",
             f"follow it:    squeue -r -j {job}    (or: search status --storage '{storage}')",
             f"cancel it:    scancel {job}",
             f"worker logs:  slurm/{spec.study_name}/logs/worker-{job}_*.log",
             f"checkpoints:  {spec.checkpoint_dir} (every node must share this folder)",
             f"dashboard:    search dashboard --storage '{storage}'"]
    if tracker.run_url():
        lines.append(f"MLflow:       {tracker.run_url(parent)}")
    for line in lines:
        print(f"search run: {line}", flush=True)
    if not opts.wait:
        return 0
    progress = Progress(study, spec.n_trials, epochs)
    progress.watch()
    try:
        while slurm.array_tasks(job):
            time.sleep(2.0)
    except KeyboardInterrupt:
        subprocess.run(["scancel", job], capture_output=True)
        progress.close()
        print(f"search run: cancelled Slurm job array {job}; its trials resume from their "
              "checkpoints with the next command on the study", file=sys.stderr)
        return 130
    leave_study(study, tracker, parent, progress, "FINISHED")
    done = finished_by(study)
    print(f"search run: Slurm job array {job} ended; the study has {done} finished trials",
          flush=True)
    if spec.n_trials is not None and done < spec.n_trials:
        raise WorkersGaveUp(f"{spec.n_trials - done} of {spec.n_trials} trials did not run; "
                            f"see slurm/{spec.study_name}/logs/worker-{job}_*.log")
    return 0
