"""Worker processes on one study, and the terminal progress that watches them.

`--workers N` starts N processes (spawned, so each has a clean torch); each opens the storage
itself and runs its share of `--n-trials`. With several GPUs they are assigned round-robin; on
the CPU the cores are split between them. The parent only watches the storage and draws bars.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import sys
import threading
import time

import optuna
from tqdm import tqdm

from search.checkpoints import CheckpointStore
from search.errors import UserError
from search.logs import quiet_libraries
from search.packed import run_packed
from search.recovery import STOP, Interrupted, RetryDeadTrial, reap_dead_local_trials, requeue_interrupted
from search.storage import wait_for_attr
from search.study import TRIAL_FAILURES, Objective, RunSpec, TrialRunner, enqueue_fixed_trials, open_study
from search.tracking import PARENT_ATTR, Tracker
from trainer.config import ConfigError
from trainer.data import DataError

State = optuna.trial.TrialState


def shares(n_trials: int | None, workers: int) -> list[int | None]:
    """Splits the command's trial budget exactly: trials in total, however many workers."""
    if n_trials is None:
        return [None] * workers
    return [n_trials // workers + (i < n_trials % workers) for i in range(workers)]


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


def run_worker(spec: RunSpec, index: int, n_trials: int | None, threads: int | None) -> None:
    """One worker: open the study, run its share of trials. Trial failures (divergence, an
    impossible combination) fail that trial only; anything else ends the worker."""
    quiet_libraries()
    if threads:
        import torch

        torch.set_num_threads(threads)
    space = spec.load_space()
    study, _ = open_study(spec, space, worker=index)
    tracker = Tracker(spec.mlflow_uri, spec.study_name)
    parent = wait_for_attr(study, PARENT_ATTR)
    handler = RetryDeadTrial(spec.max_retry, spec.mlflow_uri)
    # the journal file and the gRPC proxy have no heartbeat: reap trials of dead processes on
    # this machine instead
    no_heartbeat = "://" not in spec.storage or spec.storage.startswith("grpc://")
    reaper = (lambda s: reap_dead_local_trials(s, handler)) if no_heartbeat else None
    runner = TrialRunner(space, worker_device(index, spec.overrides), tracker, parent,
                         CheckpointStore(spec.checkpoint_dir, spec.study_name,
                                         spec.keep_checkpoints), reaper)
    if reaper is not None:
        reaper(study)
    if n_trials == 0:
        return
    STOP.install()
    if spec.pack > 1:
        run_packed(study, runner, spec.pack, n_trials, spec.timeout, handler)
        return
    objective = Objective(runner)
    try:
        study.optimize(objective, n_trials=n_trials, timeout=spec.timeout, catch=TRIAL_FAILURES,
                       callbacks=[lambda s, t: STOP.raised and s.stop()])
    except (Interrupted, KeyboardInterrupt):
        requeue_interrupted(study, objective.current, handler)
        raise KeyboardInterrupt from None


def _worker_entry(spec: RunSpec, index: int, n_trials: int | None, threads: int | None) -> None:
    try:
        run_worker(spec, index, n_trials, threads)
    except (UserError, ConfigError, DataError) as exc:
        print(f"search run: worker {index}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


class Progress:
    """Study bar (done / pruned / failed, best, ETA) and the running trials' epoch and val acc,
    read from the storage so it works the same for one worker or many."""

    def __init__(self, study: optuna.Study, total: int | None, epochs: int):
        self.study, self.total, self.epochs = study, total, epochs
        self.baseline = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.start = time.time()
        self.bar = tqdm(total=total, desc=f"study {study.study_name}", unit="trial",
                        file=sys.stderr, dynamic_ncols=True)
        self.stop = threading.Event()

    def refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        new = [t for t in trials if t.number not in self.baseline]
        done = [t for t in new if t.state.is_finished()]
        counts = {s: sum(t.state == s for t in done) for s in (State.COMPLETE, State.PRUNED,
                                                               State.FAIL)}
        complete = [t for t in trials if t.state == State.COMPLETE and t.value is not None]
        best = max((t.value for t in complete), default=None)
        running = [t for t in trials if t.state == State.RUNNING]
        post = {"ok": counts[State.COMPLETE], "pruned": counts[State.PRUNED],
                "failed": counts[State.FAIL]}
        if best is not None:
            post["best"] = f"{best:.4f}"
        now = datetime.datetime.now()
        for t in running[:2]:
            if t.intermediate_values and t.datetime_start:
                step = max(t.intermediate_values)
                # resumed trials inherit earlier epochs: time only those run since the start
                ran = max(1, step - int(t.user_attrs.get("resumed_from_epoch", 0)))
                eta = (now - t.datetime_start).total_seconds() / ran * (self.epochs - step)
                post[f"#{t.number}"] = (f"ep {step}/{self.epochs} acc "
                                        f"{t.intermediate_values[step]:.3f} eta {eta:.0f}s")
        self.bar.n = len(done) if self.total is None else min(len(done), self.total)
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

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
            self.bar.close()


def run_study(spec: RunSpec, workers: int = 1) -> optuna.Study:
    """Creates or resumes the study, then runs `workers` workers on it until their shares of
    `spec.n_trials` (or the timeout) are spent. Returns the study."""
    space = spec.load_space()
    study, created = open_study(spec, space)
    tracker = Tracker(spec.mlflow_uri, spec.study_name)
    parent = tracker.parent_run(study, space.text, space.hash, created)
    enqueue_fixed_trials(study, spec.fixed_trials, created)
    if spec.table and created:
        study.set_user_attr("table", spec.table)
    epochs = int(spec.overrides.get("epochs", space.fixed.get("epochs", 150)))
    progress = Progress(study, spec.n_trials, epochs)
    progress.watch()
    cpu = os.cpu_count() or 1
    try:
        if workers == 1:
            run_worker(spec, 0, spec.n_trials, None)
        else:
            ctx = mp.get_context("spawn")
            threads = max(1, cpu // workers)
            procs = [ctx.Process(target=_worker_entry, args=(spec, i, n, threads))
                     for i, n in enumerate(shares(spec.n_trials, workers))]
            for p in procs:
                p.start()
            try:
                for p in procs:
                    p.join()
            except KeyboardInterrupt:  # the workers got the signal too: let them save and stop
                for p in procs:
                    p.join(timeout=600)
                raise
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise UserError(f"{len(bad)} of {workers} workers failed (exit codes {bad})")
    finally:
        progress.close()
        summary = {"n_trials": len(study.trials)}
        try:
            summary["best_value"] = study.best_value
        except ValueError:
            pass
        tracker.finish_parent(parent, summary)
    return study
