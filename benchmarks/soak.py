"""Soak test: a PostgreSQL study on digits under fire.

Two scenarios:

- external (default): separate `search run` commands share one study; this script SIGKILLs a
  random one every few seconds and starts a new one, and restarts PostgreSQL once. When the
  study has the trials asked for, the commands are stopped with SIGTERM (the graceful path),
  and after the heartbeat's grace a `search run --n-trials 0` fails the last killed trial (a
  trial killed just before the end is stale only after the grace; nothing else runs then).
- `--supervised`: ONE `search run --workers N --n-trials T` command; this script SIGKILLs its
  worker processes mid-trial several times and restarts nothing. The command itself must replace them,
  re-queue their trials and exit 0 with exactly T trials finished.

- `--partition [--pack P]`: N `search run` commands (N machines) share one study; this script
  freezes one mid-trial with SIGSTOP past the heartbeat's grace, so another command takes its
  trial over, then thaws it (SIGCONT), several times, and restarts nothing. Every command types
  the same `--n-trials T` (the study's total) and must exit 0, the woken ones dropping the
  trials they lost; the study ends with T trials (at most one more per command asking last).

Figures: trials asked for, trials finished, kills (or pauses), trials retried, epochs
recomputed (<= 1 per kill), enqueued fixed trials run more than once (0), MLflow runs left
RUNNING (0), for `--supervised` the command's exit status (0) and processes left behind (0),
for `--partition` the commands' exit statuses, metric steps logged twice in one MLflow run (0)
and checkpoints written by a paused worker after its trial was taken over (0).

    python benchmarks/soak.py [--short] [--supervised | --partition [--pack P]] [--trials 12]
                              [--epochs 4] [--workers 4] [--kill-every 8] [--kills 4]

Exit status 0 when every figure holds. It runs on loopback only and stops by itself
(`--max-seconds`).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.pg import PostgresServer, pg_bin  # noqa: E402
from search.study.recovery import retried_numbers  # noqa: E402

STUDY = """
name: soak
space:
  fixed: {{epochs: {epochs}, dataset: digits, augment: none, optimizer: adamw}}
  params:
    lr: {{type: float, low: 3.0e-4, high: 3.0e-3, log: true}}
    batch_size: {{type: categorical, choices: [64, 128]}}
sampler: random
pruner: none
fixed_trials:
  - {{label: F1, params: {{lr: 1.0e-3, batch_size: 64}}}}
  - {{label: F2, params: {{lr: 2.0e-3, batch_size: 128}}}}
"""
State = optuna.trial.TrialState


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true",
                   help="CI size: 5 trials x 4 epochs, 3 workers, at most 3 kills")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kill-every", type=float, default=8.0)
    p.add_argument("--max-seconds", type=float, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supervised", action="store_true",
                   help="one `search run --workers N` command; nothing outside restarts workers")
    p.add_argument("--kills", type=int, default=4,
                   help="--supervised: workers to SIGKILL; --partition: commands to pause")
    p.add_argument("--partition", action="store_true",
                   help="commands frozen past the heartbeat's grace and thawed, none killed")
    p.add_argument("--pack", type=int, default=1, help="--partition: trials per pack")
    args = p.parse_args()
    if args.short:
        args.trials, args.epochs, args.workers, args.kill_every = 5, 4, 3, 5.0
        args.kills = min(args.kills, 3)
        args.max_seconds = min(args.max_seconds, 900)
    rng = random.Random(args.seed)
    bindir = pg_bin()
    if bindir is None:
        print("soak: PostgreSQL binaries not found (apt-get install postgresql)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="search-soak-"))
    (work / "soak.yaml").write_text(STUDY.format(epochs=args.epochs))
    pg = PostgresServer(bindir)
    pg.start()
    url = pg.create_database("soak")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "search", "run", "--study", "soak.yaml", "--storage", url,
           "--heartbeat", "2", "--max-retry", "20", "--n-trials", "1000"]
    logs = work / "logs"
    logs.mkdir()
    if args.supervised or args.partition:
        try:
            scenario = supervised if args.supervised else partition
            return scenario(args, rng, url, work, env, cmd, pg)
        finally:
            pg.stop("fast")
    started = 0

    def spawn() -> subprocess.Popen:
        nonlocal started
        started += 1
        log = open(logs / f"worker-{started}.log", "w")
        return subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)

    workers = [spawn()]
    time.sleep(8)  # the first one creates the study and enqueues the fixed trials
    workers += [spawn() for _ in range(args.workers - 1)]
    kills, pg_restarted = 0, False
    start = last_kill = time.time()
    study = None
    try:
        while time.time() - start < args.max_seconds:
            time.sleep(1)
            workers = [w if w.poll() is None else spawn() for w in workers]  # replace the dead
            if study is None:
                try:
                    study = optuna.load_study(study_name="soak", storage=url)
                except Exception:
                    continue
            try:
                done = len(study.get_trials(deepcopy=False, states=(State.COMPLETE,)))
            except Exception:
                continue  # PostgreSQL restarting
            if done >= args.trials:
                break
            # --short stops killing after --kills (3): the study then finishes at its own pace
            # instead of racing kills that land faster than a loaded machine starts a command
            if time.time() - last_kill >= args.kill_every and not (args.short and kills >= args.kills):
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                kills += 1
                workers[victim] = spawn()
                last_kill = time.time()
                if kills == (1 if args.short else 2) and not pg_restarted:
                    pg.stop("fast")
                    time.sleep(3)
                    pg.start()
                    pg_restarted = True
        else:
            print(f"soak: gave up after {args.max_seconds:.0f} s", file=sys.stderr)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        deadline = time.time() + 120
        for w in workers:
            try:
                w.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                w.kill()
    time.sleep(3 * 2 + 1)  # the heartbeat's grace (3 x --heartbeat 2)
    with open(logs / "tidy.log", "w") as log:
        subprocess.run([*cmd[:-1], "0"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=300)
    figures = measure(url, work, args.trials)
    pg.stop("fast")
    figures["kills"] = kills
    figures["postgres_restarts"] = int(pg_restarted)
    for key in ("trials_asked", "trials_finished", "kills", "postgres_restarts", "trials_retried",
                "epochs_recomputed", "fixed_trials_run_twice", "mlflow_runs_left_running"):
        print(f"{key}: {figures[key]}")
    ok = (figures["trials_finished"] >= args.trials
          and figures["epochs_recomputed"] <= max(kills, 0)
          and figures["fixed_trials_run_twice"] == 0
          and figures["mlflow_runs_left_running"] == 0 and pg_restarted)
    print(f"soak: {'ok' if ok else 'FAILED'} (logs in {logs})")
    return 0 if ok else 1


def worker_pids(parent: int) -> list[int]:
    """The spawned worker processes of one `search run` (children running spawn_main)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return False


def supervised(args, rng: random.Random, url: str, work: Path, env: dict, cmd: list[str],
               pg) -> int:
    """One command, its workers killed from outside, nothing restarted from outside."""
    cmd = [*cmd[:-1], str(args.trials), "--workers", str(args.workers)]
    log = open(work / "logs" / "command.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    kills, start, last_kill = 0, time.time(), time.time() + 10  # let the first trials start
    seen: set[int] = set()
    while proc.poll() is None and time.time() - start < args.max_seconds:
        time.sleep(1)
        seen.update(worker_pids(proc.pid))
        if kills < args.kills and time.time() - last_kill >= args.kill_every:
            try:  # a worker mid-trial (one between trials loses nothing to recompute)
                running = optuna.load_study(study_name="soak", storage=url).get_trials(
                    deepcopy=False, states=(State.RUNNING,))
            except Exception:
                continue
            pids = sorted({t.user_attrs.get("worker_pid") for t in running}
                          & set(worker_pids(proc.pid)))
            if pids:
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                kills += 1
                last_kill = time.time()
    if proc.poll() is None:
        print(f"soak: gave up after {args.max_seconds:.0f} s", file=sys.stderr)
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    time.sleep(2)
    left = [p for p in seen if alive(p)]  # workers outliving their command: orphans
    figures = measure(url, work, args.trials)
    figures.update(kills=kills, exit_status=code, processes_left=len(left))
    for key in ("trials_asked", "trials_finished", "kills", "trials_retried", "epochs_recomputed",
                "fixed_trials_run_twice", "mlflow_runs_left_running", "exit_status",
                "processes_left"):
        print(f"{key}: {figures[key]}")
    ok = (code == 0 and figures["trials_finished"] == args.trials and kills == args.kills
          and figures["trials_retried"] >= 1 and figures["epochs_recomputed"] <= kills
          and figures["fixed_trials_run_twice"] == 0 and figures["mlflow_runs_left_running"] == 0
          and not left)
    print(f"soak --supervised: {'ok' if ok else 'FAILED'} (log in {work / 'logs'})")
    return 0 if ok else 1


def partition(args, rng: random.Random, url: str, work: Path, env: dict, cmd: list[str],
              pg) -> int:
    """N commands on one study; one at a time frozen past the grace, then thawed."""
    procs = []
    for i in range(args.workers):  # N machines, the same command: they share the total
        log = open(work / "logs" / f"command-{i}.log", "w")
        procs.append(subprocess.Popen(
            [*cmd[:-1], str(args.trials), "--pack", str(args.pack), "--keep-checkpoints"],
            cwd=work,
            env=env, stdout=log, stderr=subprocess.STDOUT))
        if i == 0:
            time.sleep(8)  # the first one creates the study and enqueues the fixed trials
    pauses, start, last = 0, time.time(), time.time()
    grace = 3 * 2  # --heartbeat 2
    while any(p.poll() is None for p in procs) and time.time() - start < args.max_seconds:
        time.sleep(1)
        if pauses >= args.kills or time.time() - last < args.kill_every:
            continue
        try:
            running = optuna.load_study(study_name="soak", storage=url).get_trials(
                deepcopy=False, states=(State.RUNNING,))
        except Exception:
            continue
        busy = [p for p in procs if p.poll() is None
                and any(t.user_attrs.get("worker_pid") == p.pid for t in running)]
        if len(busy) < 2 and len([p for p in procs if p.poll() is None]) < 2:
            continue  # nobody left to take the trial over
        if not busy:
            continue
        victim = rng.choice(busy)
        victim.send_signal(signal.SIGSTOP)
        time.sleep(grace + 8)  # past the grace, and time for another command to ask
        victim.send_signal(signal.SIGCONT)
        pauses += 1
        last = time.time()
    for p in procs:
        if p.poll() is None:
            print(f"soak: gave up after {args.max_seconds:.0f} s", file=sys.stderr)
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=120))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    figures = measure(url, work, args.trials)
    figures.update(pauses=pauses, exit_statuses=",".join(map(str, codes)))
    for key in ("trials_asked", "trials_finished", "pauses", "trials_retried", "epochs_recomputed",
                "fixed_trials_run_twice", "mlflow_runs_left_running", "exit_statuses",
                "metric_steps_logged_twice", "checkpoints_overwritten_by_stale_workers"):
        print(f"{key}: {figures[key]}")
    ok = (set(codes) == {0}
          and args.trials <= figures["trials_finished"] <= args.trials + args.workers - 1
          and pauses == args.kills and figures["metric_steps_logged_twice"] == 0
          and figures["checkpoints_overwritten_by_stale_workers"] == 0
          and figures["fixed_trials_run_twice"] == 0 and figures["mlflow_runs_left_running"] == 0)
    print(f"soak --partition: {'ok' if ok else 'FAILED'} (logs in {work / 'logs'})")
    return 0 if ok else 1


def stale_writes(trials: dict, work: Path) -> int:
    """Checkpoint files of failed-and-retried attempts written after the attempt was failed
    (kept with --keep-checkpoints; each attempt writes its own file)."""
    import datetime

    from search.study.checkpoints import CheckpointStore
    from search.study.recovery import chain_root

    store = CheckpointStore(work / "checkpoints", "soak")
    count = 0
    for t in trials.values():
        if t.state != State.FAIL or t.datetime_complete is None:
            continue
        path = store.path(chain_root(t), t.number)
        if path.is_file():
            written = datetime.datetime.fromtimestamp(path.stat().st_mtime)
            count += written > t.datetime_complete
    return count


def measure(url: str, work: Path, asked: int) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="soak", storage=url)
    trials = {t.number: t for t in study.get_trials()}
    recomputed = 0
    for t in trials.values():
        pred = t.system_attrs.get("failed_trial")
        if pred is None or not t.intermediate_values and t.state == State.WAITING:
            continue
        if t.state == State.WAITING:
            continue
        reached = max(trials[pred].intermediate_values, default=0)
        recomputed += max(0, reached - int(t.user_attrs.get("resumed_from_epoch", 0)))
    complete_labels = [t.user_attrs["label"] for t in trials.values()
                       if "label" in t.user_attrs and t.state == State.COMPLETE]
    roots = [t.user_attrs["label"] for t in trials.values()
             if "label" in t.user_attrs and "failed_trial" not in t.system_attrs]
    twice = (len(complete_labels) - len(set(complete_labels))) + (len(roots) - len(set(roots)))
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("soak")
    runs = client.search_runs([exp.experiment_id], max_results=5000) if exp else []
    retried = retried_numbers(list(trials.values()))
    twice_logged = 0
    for run in runs:
        if run.data.tags.get("kind") == "study":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        twice_logged += len(steps) - len(set(steps))
    return {
        "trials_asked": asked,
        # every finished trial once: a failed attempt that was retried stands for nothing
        "trials_finished": sum(t.state.is_finished() and n not in retried
                               for n, t in trials.items()),
        "trials_retried": sum("failed_trial" in t.system_attrs for t in trials.values()
                              if t.state != State.WAITING),
        "epochs_recomputed": recomputed,
        "fixed_trials_run_twice": twice,
        "mlflow_runs_left_running": sum(r.info.status == "RUNNING" for r in runs),
        "metric_steps_logged_twice": twice_logged,
        "checkpoints_overwritten_by_stale_workers": stale_writes(trials, work),
    }


if __name__ == "__main__":
    sys.exit(main())
