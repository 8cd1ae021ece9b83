"""What a worker spends between epochs, outside `Engine.run_epoch`: the bookkeeping a GPU waits for.

Runs the real worker loop (`search.worker.loop.run_trials`) on real stores -- the embedded
defaults (journal file, sqlite MLflow store) and, with `--server`, PostgreSQL and an `mlflow
server` as on a cluster -- with P trials in flight (one pack of P, `--packs`), each trial E
epochs on digits (not CIFAR-100; bookkeeping does not depend on the data: a checkpoint is the
same 815k-parameter LeNet-5 with its optimiser state whatever it learns). Every call the loop
makes between epochs is timed by kind:

    start       ask (the sampler) and begin (MLflow run, checkpoint lookup, attributes, the
                engine's new row), per trial
    checkpoint  the state copied from the engine and saved, per trial-epoch
    report      the epoch's report less what is named below (Optuna report, attributes)
    pruner      should_prune
    tracking    MLflow calls made while reporting (metrics)
    storage     fencing reads and other storage reads (stale trials, the ramp)
    end         tell, and the run closed, checkpoints removed, the end's one write, per trial
    other       the rest of the time outside run_epoch
    setup       the dataset loaded and put on the device for the pack's shape (`prepare`), once
                per command: in ms per command, not in the per-trial-epoch sum nor in start
    exit        the queues drained when the command ends (MLflow calls still queued, checkpoint
                writes), once per command: in ms per command, not in the per-trial-epoch sum

Checkpoints follow `--checkpoint-every` as `search run` does (default `auto`; `1` is every
epoch, the default before `auto`).

and again after the study already holds 500 and 2,000 finished trials (`--study-sizes`), so
its growth shows. The validation split is 90 % of digits' training set, only to keep the
engine's share of a CPU run short; it changes nothing measured here.

    python benchmarks/bookkeeping.py [--server] [--packs 1,16,64] [--study-sizes 0,500,2000]
    python benchmarks/bookkeeping.py --quick   # P 1 and 4, sizes 0 and 100, both stores
    python benchmarks/bookkeeping.py --against REV ...   # the same at commit REV, side by side
    python benchmarks/bookkeeping.py --checkpoint-every 1 ...  # every epoch (auto: default)
    python benchmarks/bookkeeping.py --sample-ahead ...  # the widest pack refilled once (2P
        # trials), without and with `search run --sample-ahead`'s child, side by side

`--against REV` runs this same script in a git worktree of REV (the loop's names it times must
exist there: from the restructured layout on) with the same arguments, and prints its table
and the ratio of each figure to REV's.

Last line: `bookkeeping_ms_per_trial_epoch_p64: X (server stores: Y) start_ms_per_trial: Z`
(the widest pack measured; Y is `-` without `--server`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = ("start", "checkpoint", "report", "pruner", "tracking", "storage", "end", "other", "setup",
         "exit")
PER_TRIAL = ("start", "end")
ONCE = ("setup", "exit")  # per command
SPACE = """
name: bookkeeping
fixed: {optimizer: adamw, dataset: digits, batch_size: 128, augment: none, val_fraction: 0.9}
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  weight_decay: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
"""


class Clock:
    """Exclusive wall time by kind. Inside a report, nested calls count as their own kinds;
    inside a start or an end, everything counts as that start or end."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.stack: list[tuple[str, float, float]] = []  # (kind, started, nested time)
        self.first: tuple[float, int] | None = None  # start time and trials after the first refill

    @contextlib.contextmanager
    def measure(self, kind: str):
        outer = self.stack[0][0] if self.stack else None
        if kind != "setup" and (outer in PER_TRIAL or (outer is not None and outer != "report"
                                                         and kind != "epoch")):
            yield  # counted by the enclosing start or end (or checkpoint)
            return
        self.stack.append((kind, time.perf_counter(), 0.0))
        try:
            yield
        finally:
            k, t0, nested = self.stack.pop()
            took = time.perf_counter() - t0
            self.spent[k] += took - nested
            if self.stack:
                pk, pt0, pn = self.stack[-1]
                self.stack[-1] = (pk, pt0, pn + took)

    def wrap(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.measure(kind):
                return original(*args, **kwargs)

        setattr(owner, name, timed)


def instrument(clock: Clock) -> None:
    import optuna

    from search.study import session
    from search.tracking import client
    from search.worker import loop, sizing
    from trainer import engine

    for owner, name, kind in (
            (loop.WorkerLoop, "_ask", "start"),  # the sampler, the run, the data, the new row
            (engine.Engine, "state", "checkpoint"), (session.TrialSession, "save", "checkpoint"),
            (session.TrialSession, "checkpoint", "checkpoint"),
            (session.TrialSession, "on_epoch", "report"),
            (loop.WorkerLoop, "_write_reports", "report"),  # the pack's one write of its reports
            (optuna.Trial, "should_prune", "pruner"),
            (client.Tracker, "log_epoch", "tracking"), (client.Tracker, "tag", "tracking"),
            (session.TrialSession, "owned", "storage"),
            (loop.WorkerLoop, "_running_ids", "storage"),  # one fencing read per pack
            (optuna.storages, "fail_stale_trials", "storage"),
            (session.TrialSession, "completed", "end"), (session.TrialSession, "pruned", "end"),
            (session.TrialSession, "failed", "end"), (loop.WorkerLoop, "_tell", "end"),
            (engine.Engine, "run_epoch", "epoch")):
        if hasattr(owner, name):  # an older tree (--against) may not have each of them
            clock.wrap(owner, name, kind)
    try:  # a trial's end is written when its block ends, after `_tell` (a tree from 213209b on)
        try:
            from search.optuna_seam import writes as optuna_writes
        except ImportError:  # a tree before the seam was one package
            from search import optuna_writes

        clock.wrap(optuna_writes, "_write_held", "end")  # inside a start: counted as the start
    except ImportError:
        pass
    from trainer import runtime  # the loop imports `prepare` from it when it needs it

    runtime.prepare = _timed(clock, runtime.prepare, "setup")
    # the loop looks these up in its own module's namespace
    loop.in_flight_limit = _timed(clock, sizing.in_flight_limit, "storage")


def _timed(clock: Clock, fn, kind: str):
    def timed(*args, **kwargs):
        with clock.measure(kind):
            return fn(*args, **kwargs)

    return timed


def prefill(study, n: int, epochs: int) -> None:
    """`n` finished trials of the same space, as a study that has run a while holds them."""
    import random

    import optuna

    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True)}
    rng = random.Random(0)
    trials = []
    for _ in range(n):
        curve = sorted(rng.uniform(0.1, 0.9) for _ in range(epochs))
        trials.append(optuna.trial.create_trial(
            params={"lr": 10 ** rng.uniform(-4, -2), "weight_decay": 10 ** rng.uniform(-6, -3)},
            distributions=dist, value=curve[-1],
            intermediate_values={e + 1: v for e, v in enumerate(curve)}))
    for i in range(0, n, 250):
        study.add_trials(trials[i:i + 250])


def measure(pack: int, size: int, epochs: int, storage: str, mlflow_uri: str, workdir: Path,
            label: str, cadence: str | None = None, trials: int | None = None,
            ahead: bool = False) -> dict:
    """One pack of `pack` trials (`trials` in all: refilled as trials end), `epochs` each, on a
    study that holds `size` finished ones; `ahead`: with `--sample-ahead`'s child."""
    import optuna
    import torch

    from search.inputs.algorithms import make_pruner, make_sampler
    from search.inputs.space import parse_space
    from search.logs import quiet_libraries
    from search.study.checkpoints import CheckpointStore
    from search.study.recovery import RetryDeadTrial
    from search.study.session import TrialRunner
    from search.study.storage import open_storage
    from search.tracking.client import Tracker
    from search.worker import loop

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(os.cpu_count() or 1)
    space = parse_space(SPACE, "bookkeeping.yaml")
    name = f"{label}-p{pack}-n{size}-{os.getpid()}"
    study = optuna.create_study(storage=open_storage(storage, heartbeat=10), study_name=name,
                                direction="maximize", sampler=make_sampler("tpe", space, 0),
                                pruner=make_pruner("median", epochs))
    prefill(study, size, epochs)
    child = None
    if ahead:  # started as `run_worker` starts it: once the study is open, drawing the first refill
        from search.worker.ahead import SampleAhead
        child = SampleAhead(storage, name, "tpe", SPACE, "bookkeeping.yaml", 0)
        child.request(pack)
    tracker = Tracker(mlflow_uri, name)
    parent = tracker.parent_run(None, name, space.text, space.hash)
    store = CheckpointStore(workdir / "checkpoints", name)
    if cadence is None:  # the tree's own default
        runner = TrialRunner(space, {"epochs": epochs, "seed": 0}, tracker, parent, store)
    else:
        from search.inputs.values import cadence_value
        runner = TrialRunner(space, {"epochs": epochs, "seed": 0}, tracker, parent, store,
                             checkpoint_every=cadence_value(cadence))
    clock = Clock()
    instrument_once(clock)
    CLOCK[0] = clock
    start = time.perf_counter()
    try:
        loop.run_trials(study, runner, pack, trials or pack, None, RetryDeadTrial(0, tracker.uri),
                        ramp=None, **({"ahead": child} if child else {}))  # older trees: none
        ended = time.perf_counter()
    finally:
        if child is not None:  # once per command: counted in exit
            child.close()
    store.drain()
    tracker.drain()
    wall = time.perf_counter() - start
    clock.spent["exit"] = wall - (ended - start)
    ran = [t for t in study.get_trials(deepcopy=False) if t.number >= size]
    trial_epochs = sum(len(t.intermediate_values) for t in ran)
    spent = dict(clock.spent)
    outside = wall - spent.pop("epoch", 0.0)
    spent["other"] = max(0.0, outside - sum(spent.get(k, 0.0) for k in KINDS if k != "other"))
    recurring = sum(spent.get(k, 0.0) for k in KINDS if k not in PER_TRIAL + ONCE)
    first_s, first_n = clock.first or (spent.get("start", 0.0), len(ran))
    later = {"first_start_ms": 1000 * first_s / max(1, first_n), "later_trials": len(ran) - first_n,
             "later_start_ms": 1000 * (spent.get("start", 0.0) - first_s) / max(1, len(ran) - first_n),
             "drawn_ahead": sum(bool(t.user_attrs.get("drawn_ahead")) for t in ran),
             "epochs_s": wall - outside}
    return {**later, "label": label, "pack": pack, "size": size, "trials": len(ran),
            "trial_epochs": trial_epochs, "wall_s": wall, "outside_s": outside,
            "ms": {k: 1000 * spent.get(k, 0.0) / (len(ran) if k in PER_TRIAL else 1 if k in ONCE
                                                  else trial_epochs) for k in KINDS},
            "per_trial_epoch_ms": 1000 * recurring / trial_epochs,
            "all_told_ms": 1000 * (outside - sum(spent.get(k, 0.0) for k in ONCE)) / trial_epochs}


CLOCK: list[Clock | None] = [None]
_INSTRUMENTED = [False]


def instrument_once(clock: Clock) -> None:
    """Wraps the loop's calls once per process; each measurement swaps in its own clock."""
    if _INSTRUMENTED[0]:
        return
    _INSTRUMENTED[0] = True

    class Current(Clock):  # forwards to whichever clock the current measurement uses
        def measure(self, kind):
            return CLOCK[0].measure(kind)

    instrument(Current())
    from search.worker import loop

    refill = loop.WorkerLoop._refill

    def first_refill_noted(self):  # what the first refill cost, apart from the later ones
        refill(self)
        if CLOCK[0].first is None:
            CLOCK[0].first = (CLOCK[0].spent["start"], self.asked)

    loop.WorkerLoop._refill = first_refill_noted


@contextlib.contextmanager
def server_stores(workdir: Path):
    """PostgreSQL (benchmarks/pg.py) and an `mlflow server` on loopback, for as long as needed."""
    from benchmarks.pg import PostgresServer, free_port, pg_bin

    bindir = pg_bin()
    if bindir is None:
        sys.exit("bookkeeping: --server needs PostgreSQL (apt-get install postgresql)")
    pg = PostgresServer(bindir)
    pg.start()
    port = free_port()
    base = workdir / "mlflow-server"
    base.mkdir()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{base}/mlflow.db",
         "--artifacts-destination", str(base / "artifacts"), "--workers", "1"],
        cwd=base, stdout=open(base / "log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # see tests/conftest
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    sys.exit(f"bookkeeping: mlflow server did not start: "
                             f"{(base / 'log').read_text()[-1000:]}")
                time.sleep(0.5)
        yield pg.create_database("bookkeeping"), url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        pg.stop("immediate")
        shutil.rmtree(pg.dir, ignore_errors=True)


def table(rows: list[dict]) -> str:
    head = ("| stores | P | study holds | trials | trial-epochs | " + " | ".join(KINDS)
            + " | per trial-epoch | all told |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['label']} | {r['pack']} | {r['size']} | {r['trials']} | "
                     f"{r['trial_epochs']} | " + " | ".join(f"{ms[k]:.1f}" for k in KINDS)
                     + f" | {r['per_trial_epoch_ms']:.1f} | {r['all_told_ms']:.1f} |")
    return "\n".join(lines)


def ahead_table(rows: list[dict]) -> str:
    lines = ["| stores | study holds | trials | start, first refill | start, later refills | "
             "drawn ahead | epochs |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['size']} | {r['trials']} | {r['first_start_ms']:.1f} | "
              f"{r['later_start_ms']:.1f} ({r['later_trials']} trials) | {r['drawn_ahead']} | "
              f"{r['epochs_s']:.1f} s |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", default="1,16,64")
    ap.add_argument("--study-sizes", default="0,500,2000",
                    help="finished trials already in the study (the widest pack only)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--server", action="store_true", help="also PostgreSQL + an mlflow server")
    ap.add_argument("--quick", action="store_true", help="P 1 and 4, sizes 0 and 100, 2 epochs, "
                    "both stores (CI)")
    ap.add_argument("--checkpoint-every", metavar="CADENCE",
                    help="as `search run --checkpoint-every` (default: the tree's own, auto)")
    ap.add_argument("--against", metavar="REV", help="also run this at commit REV; print ratios")
    ap.add_argument("--sample-ahead", action="store_true", help="the widest pack refilled once "
                    "(2P trials), without and with `search run --sample-ahead`, side by side")
    ap.add_argument("--json", help=argparse.SUPPRESS)  # rows for --against
    args = ap.parse_args(argv)
    if args.against:
        return against(args.against, [a for a in (argv or sys.argv[1:])
                                      if a != "--against" and a != args.against])
    if args.quick:
        args.packs, args.study_sizes, args.epochs, args.server = "1,4", "0,100", 2, True
    packs = [int(p) for p in args.packs.split(",")]
    sizes = [int(s) for s in args.study_sizes.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"bookkeeping: digits (not CIFAR-100), {args.epochs}-epoch trials, one pack of P; "
          f"ms per trial-epoch (start, end: per trial; setup, exit: per command); commit {commit}; {platform.node()}, "
          f"{os.cpu_count()} cores; python {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bookkeeping-") as tmp:
        work = Path(tmp)
        stores = [("embedded", str(work / "journal.log"), f"sqlite:///{work}/mlflow.db")]
        with contextlib.ExitStack() as stack:
            if args.server:
                pg_url, mlflow_url = stack.enter_context(server_stores(work))
                stores.append(("server", pg_url, mlflow_url))
            for label, storage, mlflow_uri in stores:
                for pack in packs:
                    both = args.sample_ahead and pack == max(packs)
                    for size in (sizes if pack == max(packs) else [0]):
                        for ahead in (False, True) if both else (False,):
                            rows.append(measure(pack, size, args.epochs, storage, mlflow_uri, work,
                                                label + (" + ahead" if ahead else ""),
                                                args.checkpoint_every, 2 * pack if both else None,
                                                ahead))
                            print(table(rows[-1:]).splitlines()[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print()
    print(table(rows))
    widest = max(packs)
    if args.sample_ahead:
        print(f"\nsampling ahead (P {widest}, {2 * widest} trials; with the child, the first refill "
              "is drawn from the study's open on, while the worker sets up; ms per trial; epochs: "
              "wall seconds in run_epoch)")
        print(ahead_table([r for r in rows if r["pack"] == widest]))

    def figure(label: str, key: str) -> str:
        found = [r for r in rows if r["label"] == label and r["pack"] == widest and r["size"] == 0]
        return f"{found[0][key] if key != 'start' else found[0]['ms']['start']:.1f}" if found else "-"

    print(f"bookkeeping_ms_per_trial_epoch_p{widest}: {figure('embedded', 'per_trial_epoch_ms')} "
          f"(server stores: {figure('server', 'per_trial_epoch_ms')}) start_ms_per_trial: "
          f"{figure('embedded', 'start')} (server stores: {figure('server', 'start')})")
    return 0


def against(rev: str, rest: list[str]) -> int:
    """This script at `rev` and here, with the same arguments, one after the other."""
    from benchmarks.against import worktree  # here only: the copy at `rev` runs without it

    root = Path(__file__).resolve().parent.parent
    with worktree(rev) as tree, tempfile.TemporaryDirectory(prefix="bookkeeping-") as tmp:
        shutil.copy(__file__, tree / "benchmarks" / "bookkeeping.py")
        results = {}
        for name, where in ((rev, tree), ("this tree", root)):
            out = Path(tmp) / f"{len(results)}.json"
            print(f"== {name}", flush=True)
            r = subprocess.run([sys.executable, str(where / "benchmarks" / "bookkeeping.py"),
                                *rest, "--json", str(out)], cwd=where)
            if r.returncode != 0:
                return r.returncode
            results[name] = json.loads(out.read_text())
    base, now = results[rev], results["this tree"]
    print(f"\nratio (this tree / {rev}), per trial-epoch and all told:")
    for b, n in zip(base, now, strict=True):
        print(f"| {n['label']} | P {n['pack']} | study holds {n['size']} | "
              f"{n['per_trial_epoch_ms'] / b['per_trial_epoch_ms']:.3f} | "
              f"{n['all_told_ms'] / b['all_told_ms']:.3f} | start "
              f"{n['ms']['start'] / max(b['ms']['start'], 1e-9):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
