"""Sampling ahead (`search run --sample-ahead`, search.worker.ahead): the next refill's
parameters drawn in a child process that only reads the study, used by the trials the worker
starts next, and a child that never outlives its worker."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from search.inputs.algorithms import make_sampler
from search.inputs.space import parse_space
from search.study.storage import open_storage
from search.worker.ahead import SampleAhead, drawing, wanted
from tests.conftest import ROOT, run_cli

State = optuna.trial.TrialState
SPACE = """
name: ahead
fixed: {optimizer: adamw, dataset: digits, batch_size: 128, augment: none, epochs: 3}
params:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  weight_decay: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}
"""


def _finished_study(storage: str, n: int) -> optuna.Study:
    space = parse_space(SPACE, "ahead.yaml")
    study = optuna.create_study(study_name="ahead", storage=open_storage(storage),
                                direction="maximize")
    dists = {p.name: optuna.distributions.FloatDistribution(p.low, p.high, log=True)
             for p in space.params}
    for i in range(n):
        lr = 1e-4 * 100 ** (i / n)
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "weight_decay": 1e-5}, distributions=dists,
            value=1 - abs(lr - 1e-3) * 100, intermediate_values={1: 0.5}))
    return study


def _in_space(values: dict) -> bool:
    return (set(values) == {"lr", "weight_decay"} and 1e-4 <= values["lr"] <= 1e-2
            and 1e-6 <= values["weight_decay"] <= 1e-3)


def test_drawn_sets_follow_the_space_and_write_nothing_to_the_study(tmp_path):
    study = _finished_study(str(tmp_path / "j.log"), 30)
    running = study.ask()  # another worker's trial in flight: the liar counts it
    running.suggest_float("lr", 1e-4, 1e-2, log=True)
    space = parse_space(SPACE, "ahead.yaml")
    sets = list(itertools.islice(drawing(study.get_trials(deepcopy=False), study.directions,
                                         make_sampler("tpe", space, 0), space), 4))
    assert len(sets) == 4 and all(_in_space(s) for s in sets), sets
    assert len({s["lr"] for s in sets}) == 4  # each drawn with the ones before it running
    assert len(study.get_trials()) == 31  # read only


def test_the_child_draws_while_the_worker_waits_for_nothing_and_ends_with_it(tmp_path):
    storage = str(tmp_path / "j.log")
    _finished_study(storage, 20)
    ahead = SampleAhead(storage, "ahead", "tpe", SPACE, "ahead.yaml", seed=0)
    try:
        assert ahead.next() is None  # nothing asked yet: the worker samples itself, at once
        ahead.request(50)
        ahead.request(3)  # a newer refill's: the first request's sets are dropped
        sets, deadline = [], time.time() + 120
        while len(sets) < 3 and time.time() < deadline:
            time.sleep(0.05)
            sets += [s for s in [ahead.next()] if s is not None]  # one as each is drawn
        assert len(sets) == 3 and all(_in_space(s) for s in sets), sets
        assert len({s["lr"] for s in sets}) == 3
        time.sleep(1)
        assert ahead.next() is None  # three asked, three drawn: nothing of the first request
        ahead.request(2, left=0)  # the worker's budget is spent: nothing to draw
        time.sleep(1)
        assert ahead.next() is None
    finally:
        ahead.close()
    assert not ahead.proc.is_alive()


def test_a_child_started_before_its_study_exists_draws_once_the_command_creates_it(tmp_path):
    storage = str(tmp_path / "j.log")
    ahead = SampleAhead(storage, "ahead", "tpe", SPACE, "ahead.yaml", seed=0)
    try:
        ahead.request(3)  # asked at the command's start, before it opens (creates) the study
        time.sleep(2)
        assert ahead.next() is None and not (tmp_path / "j.log").exists()  # it creates nothing
        _finished_study(storage, 20)
        ahead.top_up(2)  # the pack sized: 2 wanted, 3 asked already -- the request stands
        sets, deadline = [], time.time() + 120
        while len(sets) < 3 and time.time() < deadline:
            time.sleep(0.05)
            sets += [s for s in [ahead.next()] if s is not None]
        assert len(sets) == 3 and all(_in_space(s) for s in sets), sets
        ahead.top_up(5)  # more than asked: asked anew
        sets, deadline = [], time.time() + 120
        while len(sets) < 5 and time.time() < deadline:
            time.sleep(0.05)
            sets += [s for s in [ahead.next()] if s is not None]
        assert len(sets) == 5
    finally:
        ahead.close()
    assert not ahead.proc.is_alive()


def test_close_ends_a_child_whose_sets_fill_the_pipe(tmp_path):
    storage = str(tmp_path / "j.log")
    optuna.create_study(study_name="wide", storage=open_storage(storage))
    wide = SPACE.replace("ahead", "wide")
    ahead = SampleAhead(storage, "wide", "random", wide, "wide.yaml", seed=0)
    ahead.request(100_000)  # ~0.1 KB a set: the pipe fills long before the child is done
    time.sleep(5)
    ahead.close()
    assert ahead.proc.exitcode == 0  # it read the close and ended, not terminated


def test_a_killed_worker_leaves_no_sampling_child(tmp_path):
    storage = str(tmp_path / "j.log")
    _finished_study(storage, 10)
    script = textwrap.dedent(f"""
        import json, os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from search.worker.ahead import SampleAhead
        from tests.test_sample_ahead import SPACE
        ahead = SampleAhead({storage!r}, "ahead", "tpe", SPACE, "ahead.yaml", seed=None)
        ahead.request(200)  # drawing when the worker dies
        time.sleep(3)
        print(json.dumps(ahead.proc.pid), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == -9, out.stderr[-2000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    deadline = time.time() + 60
    while _alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(child), f"the sampling child {child} outlived its killed worker"


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_and_its_child_and_a_rerun_finishes(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    args = ["run", "--space", "s.yaml", "--n-trials", "8", "--epochs", "2", "--pack", "4",
            "--ramp", "off", "--pruner", "none", "--sample-ahead"]
    proc = subprocess.Popen([sys.executable, "-m", "search", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's job
    deadline = time.time() + 300
    while not _drawn(tmp_path):  # the second pack started from sets drawn ahead
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, the child included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    deadline = time.time() + 30  # a process still exiting under load is not one left running
    while (left := [pid for pid in _group(proc.pid) if _alive(pid)]) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"left running after Ctrl-C: {[_cmdline(pid) for pid in left]}"
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="ahead", storage=open_storage(
        str(tmp_path / "search-journal.log"))).get_trials()
    assert sum(t.state == State.COMPLETE for t in trials) == 8  # the interrupted ones resumed


def _drawn(cwd) -> bool:
    journal = cwd / "search-journal.log"
    return journal.exists() and '"drawn_ahead"' in journal.read_text()


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return f"{pid} (gone)"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("store", ["journal", "postgres"])
def test_a_packed_study_starts_its_refills_with_sets_drawn_ahead(store, tmp_path, request):
    (tmp_path / "s.yaml").write_text(SPACE)
    url = (str(tmp_path / "j.log") if store == "journal"
           else request.getfixturevalue("postgres").create_database("ahead"))
    done = run_cli("run", "--space", "s.yaml", "--storage", url, "--n-trials", "8", "--epochs",
                   "2", "--pack", "4", "--ramp", "off", "--pruner", "none", "--sample-ahead",
                   "--seed", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    trials = optuna.load_study(study_name="ahead", storage=open_storage(url)).get_trials()
    assert len(trials) == 8 and all(t.state == State.COMPLETE for t in trials)
    assert all(_in_space(t.params) for t in trials)
    ahead = [t.number for t in trials if t.user_attrs.get("drawn_ahead")]
    # the first pack too: the child starts before the command creates the study and waits for it
    # (a second ahead of its first ask: MLflow's start); the refill after it comes drawn ahead
    drawn = [(t.number, t.user_attrs.get("drawn_ahead")) for t in trials]
    assert any(n < 4 for n in ahead) and any(n >= 4 for n in ahead), drawn


def test_sample_ahead_with_a_sampler_that_reads_nothing_is_one_line(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    done = run_cli("run", "--space", "s.yaml", "--sampler", "random", "--sample-ahead",
                   "--n-trials", "1", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--sample-ahead" in done.stderr and "random" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "search-journal.log").exists()  # checked before anything exists


def test_auto_samples_ahead_where_a_gpu_trains_and_the_sampler_reads_the_study():
    assert wanted("auto", "tpe", "cuda") and wanted("auto", "gp", "cuda:1")
    assert not wanted("auto", "tpe", "cpu")  # the child would take the training's cores
    assert not wanted("auto", "random", "cuda") and not wanted("off", "tpe", "cuda")
    assert wanted("on", "tpe", "cpu")
