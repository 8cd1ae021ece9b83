"""Sampling ahead (`search run --sample-ahead`): the next refill's parameters drawn in a child
process while the pack trains, so a model-based sampler's cost (TPE fits its Parzen estimators
over every trial of the study at each ask: ~30 ms at 2,000 trials on one Xeon core) is off the
worker's critical path.

After each refill the worker asks the child for as many parameter sets as it just started. The
child reads the study (it never writes to it), copies its finished and running trials into an
in-memory study with the same sampler, and asks and samples there one set after another, each
seeing the ones before it as running (TPE's constant liar), as the worker's own asks would. At
the next refill the worker starts its new trials with the sets that are ready, as fixed
parameters (Optuna's `enqueue_trial` way, without the write), and samples the rest itself; it
never waits for the child. Sets not used then are dropped: the next ones are drawn from the
study as the refill left it. A child that fails or dies leaves the worker sampling itself.

What changes: a set is drawn from the study as it stood one epoch earlier (the results of the
epoch just trained are not in it), as a sampler in another worker would draw it; with
`--seed`, which sets are ready at a refill depends on timing, so a study is not repeatable
draw for draw.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from typing import Any

import optuna

from search.inputs.algorithms import MODEL_BASED

State = optuna.trial.TrialState


def draw(trials: list[optuna.trial.FrozenTrial], directions: list, sampler: Any, space: Any,
         k: int) -> list[dict[str, Any]]:
    """`k` parameter sets from `sampler` over a copy of `trials`, each drawn with the ones
    before it running (an in-memory study: nothing is written to the real one)."""
    mirror = optuna.create_study(directions=directions, sampler=sampler)
    mirror.add_trials([t for t in trials if t.state in (State.COMPLETE, State.PRUNED,
                                                         State.RUNNING)])
    drawn = []
    for _ in range(k):
        trial = mirror.ask()
        space.sample(trial)
        drawn.append(dict(trial.params))
    return drawn


def _serve(conn: Any, storage: str, study_name: str, sampler_name: str, space_text: str,
           space_path: str, seed: int | None) -> None:
    """The child: answers each `(number, k)` with `(number, sets)` until the worker closes the
    pipe (or dies: its end of the pipe closes with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the worker's to handle
    sys.stderr = open(os.devnull, "w")  # the worker says what a storage outage is, once
    from search.inputs.algorithms import make_sampler
    from search.inputs.space import parse_space
    from search.logs import quiet_libraries
    from search.study.storage import open_storage

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        space = parse_space(space_text, space_path)
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except Exception:  # noqa: BLE001 -- the worker samples itself, as without this process
        conn.close()
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        number, k = request
        try:  # a fresh sampler per draw: its memo of the study is for one in-memory copy
            sampler = make_sampler(sampler_name, space, None if seed is None else seed + number)
            sets = draw(study.get_trials(deepcopy=False), study.directions, sampler, space, k)
        except Exception:  # noqa: BLE001 -- an outage, ...: the worker samples itself this time
            sets = []
        try:
            conn.send((number, sets))
        except (EOFError, OSError):
            return


class SampleAhead:
    """The worker's side: `request(k)` after a refill, `take(k)` at the next one (never
    waits), `close()` at the end."""

    def __init__(self, storage: str, study_name: str, sampler_name: str, space_text: str,
                 space_path: str, seed: int | None):
        ctx = mp.get_context("spawn")  # a clean interpreter: no torch, no threads copied
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, name="search-sample-ahead", daemon=True,
                                args=(child, storage, study_name, sampler_name, space_text,
                                      space_path, None if seed is None else seed + 1))
        self.proc.start()
        child.close()
        self.number, self.wanted, self.busy, self.dead = 0, None, False, False
        self.ready: list[dict[str, Any]] = []

    def request(self, k: int, left: int | None = None) -> None:
        """Asks the child for `k` sets for the next refill (at most the `left` of the worker's
        budget), unless it is still drawing."""
        k = k if left is None else min(k, left)
        self._collect()
        if self.dead or self.busy or k < 1:
            return
        self.number += 1
        try:
            self.conn.send((self.number, k))
        except (EOFError, OSError):
            self.dead = True
            return
        self.wanted, self.busy = self.number, True

    def take(self, k: int) -> list[dict[str, Any]]:
        """Up to `k` sets drawn since the last refill, if they are ready now; an answer still
        being drawn is dropped when it comes."""
        self._collect()
        ready, self.ready, self.wanted = self.ready[:k], [], None
        return ready

    def _collect(self) -> None:
        try:
            while self.busy and self.conn.poll():
                number, sets = self.conn.recv()
                self.busy = False
                if number == self.wanted:
                    self.ready = sets
        except (EOFError, OSError):
            self.dead, self.busy = True, False

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (EOFError, OSError):
            pass
        self.proc.join(timeout=5)
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


def sample_ahead(settings: Any, device: str) -> SampleAhead | None:
    """The child for a worker of `settings` training on `device`, when `wanted`."""
    if not wanted(settings.sample_ahead, settings.sampler, device):
        return None
    return SampleAhead(settings.storage, settings.study_name, settings.sampler,
                       settings.space_text, settings.space_path, settings.seed)
