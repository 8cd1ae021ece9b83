"""Sampling ahead (`search run --sample-ahead`): the next refill's parameters drawn in a child
process while the pack trains, so a model-based sampler's cost (TPE fits its Parzen estimators
over every trial of the study at each ask: ~30 ms at 2,000 trials on one Xeon core) is off the
worker's critical path.

The command starts the child before it opens the study and asks it at once for the first refill's
sets (at most a pack's), so its start-up and its draws overlap the command's own (the study and
its MLflow run opened, the worker set up); once the pack is sized exactly the worker tops the
request up if it asked too few, and after each refill asks for as many as it just started. The
child reads the study (it never writes to it), copies its finished and running trials into an
in-memory study with the same sampler, and asks and samples there one set after another, each
seeing the ones before it as running (TPE's constant liar), as the worker's own asks would. It
sends each set as soon as it is drawn and drops a request as soon as a newer one comes. At a
refill the worker starts each new trial with the next set that is ready, as fixed parameters
(Optuna's `enqueue_trial` way, without the write), and samples itself when none is; it never
waits for the child. Sets not used by then are dropped: the next ones are drawn from the study
as the refill left it. A child that fails or dies leaves the worker sampling itself.

What changes: a set is drawn from the study as it stood one epoch earlier (the results of the
epoch just trained are not in it), as a sampler in another worker would draw it; with
`--seed`, which sets are ready at a refill depends on timing, so a study is not repeatable
draw for draw.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import optuna

from search.inputs.algorithms import MODEL_BASED

State = optuna.trial.TrialState


def drawing(trials: list[optuna.trial.FrozenTrial], directions: list, sampler: Any,
            space: Any) -> Iterator[dict[str, Any]]:
    """Parameter sets from `sampler` over a copy of `trials`, each drawn with the ones before it
    running (an in-memory study: nothing is written to the real one)."""
    mirror = optuna.create_study(directions=directions, sampler=sampler)
    mirror.add_trials([t for t in trials if t.state in (State.COMPLETE, State.PRUNED,
                                                         State.RUNNING)])
    while True:
        trial = mirror.ask()
        space.sample(trial)
        yield dict(trial.params)


def _find(url: str, study_name: str, storage: Any = None) -> tuple[optuna.Study | None, Any]:
    """The study (None while its command has not created it) and the storage it was looked for
    in, kept for the next try once open (a new database is given Optuna's tables by the
    command, never by this reader; a journal file that is not there yet is not opened)."""
    from search.study.storage import is_file, open_storage, storage_url

    if storage is None:
        if is_file(storage_url(url)) and not os.path.exists(storage_url(url)):
            return None, None
        try:
            storage = open_storage(url, create=False)
        except Exception:  # noqa: BLE001 -- no tables yet, an outage: tried again
            return None, None
    try:
        return optuna.load_study(study_name=study_name, storage=storage), storage
    except Exception:  # noqa: BLE001
        return None, storage


def _serve(conn: Any, storage: str, study_name: str, sampler_name: str, space_text: str,
           space_path: str, seed: int | None) -> None:
    """The child: answers each `(number, k)` with up to `k` messages `(number, set)`, one as
    each set is drawn, until a newer request comes, and ends when the worker closes the pipe
    (or dies: its end of the pipe closes with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the worker's to handle
    sys.stderr = open(os.devnull, "w")  # the worker says what a storage outage is, once
    from search.inputs.algorithms import make_sampler
    from search.inputs.space import parse_space
    from search.logs import quiet_libraries

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        space = parse_space(space_text, space_path)
        study, store = _find(storage, study_name)  # read while the command opens it
        request = conn.recv()
        while request is not None:
            number, k = request
            while study is None and not conn.poll(0.1):  # a new study: its command creates it now
                study, store = _find(storage, study_name, store)
            if study is None:  # a newer request (or the close) came first
                request = conn.recv()
                continue
            try:  # a fresh sampler per request: its memo of the study is for one in-memory copy
                sampler = make_sampler(sampler_name, space, None if seed is None else seed + number)
                sets = drawing(study.get_trials(deepcopy=False), study.directions, sampler, space)
                for params in itertools.islice(sets, k):
                    conn.send((number, params))
                    if conn.poll():  # a newer request: this one's refill has begun
                        break
            except (EOFError, OSError):
                raise
            except Exception:  # noqa: BLE001 -- an outage, ...: the worker samples itself this time
                pass
            request = conn.recv()
    except (EOFError, OSError):  # the worker is gone
        return
    except Exception:  # noqa: BLE001 -- a bad space: the worker samples itself, as without this process
        return
    finally:
        conn.close()


class SampleAhead:
    """The worker's side: `request(k)` at the start and after each refill, `next()` for each new
    trial of a refill (never waits), `close()` at the end."""

    def __init__(self, storage: str, study_name: str, sampler_name: str, space_text: str,
                 space_path: str, seed: int | None):
        ctx = mp.get_context("spawn")  # a clean interpreter: no torch, no threads copied
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, name="search-sample-ahead", daemon=True,
                                args=(child, storage, study_name, sampler_name, space_text,
                                      space_path, None if seed is None else seed + 1))
        # born with Ctrl-C blocked (as multiprocessing's resource tracker is): a Ctrl-C while it
        # starts up is the worker's, not a traceback of the child's; the worker's waits till then
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        self.number, self.wanted, self.asked, self.dead = 0, None, 0, False
        self.ready: list[dict[str, Any]] = []

    def request(self, k: int, left: int | None = None) -> None:
        """Asks the child for `k` sets for the next refill (at most the `left` of the worker's
        budget), in place of what it was drawing; sets not used yet are dropped."""
        k = k if left is None else min(k, left)
        self._collect()
        self.ready, self.wanted = [], None
        if self.dead or k < 1:
            return
        self.number += 1
        try:
            self.conn.send((self.number, k))
        except (EOFError, OSError):
            self.dead = True
            return
        self.wanted, self.asked = self.number, k

    def top_up(self, k: int) -> None:
        """Asks for `k` sets for the first refill, keeping what the request made at the start
        (before the pack was sized exactly) draws when it asked for at least `k`."""
        if self.wanted is None or self.asked < k:
            self.request(k)

    def next(self) -> dict[str, Any] | None:
        """The next set drawn for this refill, if one is ready now."""
        self._collect()
        return self.ready.pop(0) if self.ready else None

    def _collect(self) -> None:
        try:
            while not self.dead and self.conn.poll():
                number, params = self.conn.recv()
                if number == self.wanted:
                    self.ready.append(params)
        except (EOFError, OSError):
            self.dead = True

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (EOFError, OSError):
            pass
        deadline = time.monotonic() + 5
        self.wanted = None  # what still comes is read and dropped: a child blocked on a full
        while self.proc.is_alive() and time.monotonic() < deadline:  # pipe then reads the close
            self._collect()
            self.proc.join(timeout=0.05)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()


def wanted(setting: str, sampler: str, device: str) -> bool:
    """`--sample-ahead`: on, off, or auto -- on where the worker trains on a GPU (its CPU cores
    are then idle while the device trains; on a CPU the child would take the training's)."""
    if setting == "on":
        return True
    return setting == "auto" and sampler in MODEL_BASED and device.startswith("cuda")


def sample_ahead(settings: Any, device: str, first: int) -> SampleAhead | None:
    """The child for a worker of `settings` training on `device`, when `wanted`, started before
    the study is opened and drawing at most `first` sets for the first refill at once: a study
    that exists is read while the command opens it and sets up (a new one once it is created)."""
    if not wanted(settings.sample_ahead, settings.sampler, device):
        return None
    ahead = SampleAhead(settings.storage, settings.study_name, settings.sampler,
                        settings.space_text, settings.space_path, settings.seed)
    ahead.request(first)
    return ahead
