"""Population-based training (`--pbt`): bad settings are one line each; explore never leaves the
space; a population on digits evolves through exploit steps that every tool shows (Optuna
trials with their lineage, MLflow runs with its tags, the printed schedule); a stopped PBT study
resumes its members and runs no generation twice."""

import os
import random
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.inputs.pbt import copy_limits, explore, resolve_pbt
from search.inputs.space import parse_space
from search.inputs.studyfile import load_study_file
from search.study.lineage import segments, superseded
from search.study.recovery import retried_numbers
from trainer import TrainConfig, replay

State = optuna.trial.TrialState
SPACE = """
name: pbt
fixed: {{optimizer: adamw, dataset: digits, augment: none, epochs: {epochs}, val_fraction: 0.5}}
params:
  lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}
  weight_decay: {{type: float, low: 1.0e-6, high: 1.0e-2, log: true}}
  batch_size: {{type: categorical, choices: [32, 64]}}
"""


def load(tmp_path, name="pbt"):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "search-journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("flags, names", [
    (["--pbt-population", "1"], "--pbt-population"),
    (["--pbt-interval", "6"], "--pbt-interval"),
    (["--pbt-quantile", "0.6"], "--pbt-quantile"),
    (["--pbt-quantile", "0"], "--pbt-quantile"),
    (["--pbt-mutate", "momentum"], "momentum: not a searched parameter"),
    (["--pruner", "median"], "--pbt with pruner median"),
    (["--objective", "val_acc,seconds"], "--pbt with objectives"),
    (["--n-trials", "5"], "--n-trials"),
    (["--pbt-population", "2", "--workers", "3"], "--workers 3: more workers than the 2 PBT"),
])
def test_bad_pbt_settings_are_one_line_each(cli, tmp_path, flags, names):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=6))
    r = cli("run", "--space", "s.yaml", "--pbt", *flags)
    assert r.returncode == 2, r.stderr
    assert names in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "search-journal.log").exists()  # refused before anything exists


def test_a_study_file_pbt_block_is_checked_by_key(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=6))
    (tmp_path / "st.yaml").write_text("space: s.yaml\npbt: {population: 4, every: 2}\n")
    r = cli("run", "--study", "st.yaml")
    assert r.returncode == 2 and "st.yaml: pbt.every: unknown key" in r.stderr, r.stderr
    (tmp_path / "st.yaml").write_text("space: s.yaml\npbt: {population: 4, interval: 9}\n")
    r = cli("run", "--study", "st.yaml")
    assert r.returncode == 2 and "st.yaml: pbt.interval: expected" in r.stderr, r.stderr


def test_explore_never_leaves_the_space():
    dists = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "h": IntDistribution(1, 9, step=2),
             "wd": FloatDistribution(0.0, 1.0, step=0.1), "t": CategoricalDistribution([10, 20, 30]),
             "bs": CategoricalDistribution([32, 64])}
    donor = {"lr": 9e-3, "h": 9, "wd": 0.9, "t": 30, "bs": 64}
    rng = random.Random(0)
    moved = set()
    for p in (0.0, 0.5, 1.0):
        for _ in range(300):
            out = explore(donor, dists, ["lr", "h", "wd", "t"], p, rng)
            assert out["bs"] == 64  # not asked to mutate: the donor's
            for name, value in out.items():
                assert dists[name]._contains(dists[name].to_internal_repr(value)), (name, value)
            moved |= {k for k in out if out[k] != donor[k]}
            if p == 0.0:  # perturbed: x0.8 or x1.2 of the donor's, clipped into the bounds
                assert out["lr"] in (pytest.approx(9e-3 * 0.8), 1e-2)
                assert out["t"] in (20, 30)
    assert moved == {"lr", "h", "wd", "t"}
    shapes = {"batch_size": CategoricalDistribution([32, 64, 128]),
              "augment": CategoricalDistribution(["none", "final"])}
    donor = {"batch_size": 64, "augment": "none"}
    kept = [explore(donor, shapes, list(shapes), 0.0, rng) for _ in range(50)]
    assert all(out == donor for out in kept)  # never perturbed: x1.2 of a batch is no choice
    drawn = [explore(donor, shapes, list(shapes), 1.0, rng) for _ in range(50)]
    assert {o["batch_size"] for o in drawn} == {32, 64, 128} and len({o["augment"] for o in drawn}) == 2


def test_only_a_network_or_local_workers_limits_who_copies_whom():
    """Batch size and augmentation are explored by resampling; the optimiser is copied from
    the donor, never explored; a searched number of local workers is said at the start."""
    space = parse_space("fixed: {dataset: digits, epochs: 6}\nparams:\n"
                        "  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                        "  batch_size: {type: categorical, choices: [32, 64]}\n"
                        "  optimizer: {type: categorical, choices: [adamw, sgdm]}\n"
                        "  local_workers: {type: categorical, choices: [1, 2]}\n", "k.yaml")
    pbt = resolve_pbt({}, space, 6, None, ["val_acc"])
    assert pbt.mutate == ["lr", "batch_size"]
    with pytest.raises(Exception, match="optimizer: not explored"):
        resolve_pbt({"mutate": "optimizer"}, space, 6, None, ["val_acc"])
    line = copy_limits(space, {})
    assert line.startswith("PBT: members copy only members of their own local_workers (searched "
                           "by k.yaml)")
    assert copy_limits(space, {"local_workers": 2}) is None


def test_a_kill_mid_exploit_lets_only_the_newer_segment_go_on():
    """Killed between an exploit's new segment and the end of the one it replaces, a worker
    leaves both to be retried: the rerun runs the newer one only."""
    def trial(number, state, member, start):
        t = optuna.trial.create_trial(state=state, user_attrs={"pbt_member": member,
                                                               "pbt_start_epoch": start})
        t.number = number
        return t

    trials = [trial(0, State.FAIL, 0, 0), trial(1, State.FAIL, 1, 0), trial(2, State.FAIL, 1, 2),
              trial(3, State.WAITING, 0, 0), trial(4, State.WAITING, 1, 0),
              trial(5, State.WAITING, 1, 2)]
    assert superseded(trials) == {4: 5}


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pbt")
    (tmp / "s.yaml").write_text(SPACE.format(epochs=6))
    r = subprocess.run([sys.executable, "-m", "search", "run", "--space", "s.yaml", "--pbt",
                        "--pbt-population", "4", "--pbt-interval", "2", "--pbt-mutate",
                        "lr,batch_size", "--pbt-resample-probability", "0.5", "--seed", "1"],
                       cwd=tmp, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, r, load(tmp)


@pytest.mark.slow
def test_the_population_evolves_as_optuna_trials_with_their_lineage(evolved):
    _, r, study = evolved
    trials = {t.number: t for t in study.trials}
    replaced = [t for t in trials.values() if "pbt_replaced_by" in t.user_attrs]
    assert replaced, "no exploit step happened"
    for old in replaced:
        new = trials[old.user_attrs["pbt_replaced_by"]]
        donor = trials[new.user_attrs["pbt_parent"]]
        epoch = new.user_attrs["pbt_start_epoch"]
        assert old.state == State.PRUNED and old.user_attrs["pruned_reason"] == (
            f"replaced by a copy of trial {donor.number} at epoch {epoch} (continues as trial "
            f"{new.number})")
        assert max(old.intermediate_values) == epoch and epoch % 2 == 0
        assert min(new.intermediate_values) == epoch + 1  # it goes on from the donor's epoch
        assert new.user_attrs["pbt_member"] == old.user_attrs["pbt_member"]
        # the donor copied whole: what explore may not change is the donor's
        assert new.params["weight_decay"] == donor.params["weight_decay"]
        assert new.params["lr"] != donor.params["lr"] and 1e-4 <= new.params["lr"] <= 1e-2
        assert new.params["batch_size"] in (32, 64)  # the donor's, or drawn afresh
        assert epoch in donor.intermediate_values  # the donor had reached the step
    # a loser copied a donor of another batch size: it went on in the donor's pack
    assert any(trials[trials[old.user_attrs["pbt_replaced_by"]].user_attrs["pbt_parent"]]
               .params["batch_size"] != old.params["batch_size"] for old in replaced)
    complete = [t for t in trials.values() if t.state == State.COMPLETE]
    assert sorted(t.user_attrs["pbt_member"] for t in complete) == [0, 1, 2, 3]
    assert all(max(t.intermediate_values) == 6 for t in complete)
    assert not [t for t in trials.values() if t.state == State.FAIL]
    # the budget is population x epochs: each epoch of each member trained once
    trained = [(t.user_attrs["pbt_member"], e) for t in trials.values()
               for e in t.intermediate_values if e > t.user_attrs["pbt_start_epoch"]]
    assert len(trained) == len(set(trained)) == 4 * 6
    best = study.best_trial
    schedule = best.user_attrs["pbt_schedule"]
    assert schedule[0]["first"] == 1 and schedule[-1]["last"] == 6
    assert all(a["last"] + 1 == b["first"] for a, b in zip(schedule, schedule[1:], strict=False))
    assert schedule[-1]["trial"] == best.number
    assert "PBT: the best member's schedule: epochs 1-" in r.stdout
    assert "replaced, continues as trial" in r.stderr  # the trial lines say it too


@pytest.mark.slow
def test_every_segment_is_an_mlflow_run_with_its_lineage(evolved):
    tmp, _, study = evolved
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("pbt")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    for t in study.trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["pbt_member"] == str(t.user_attrs["pbt_member"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == sorted(t.intermediate_values)  # the curve continues across runs
        if "pbt_parent" in t.user_attrs:
            assert run.data.tags["pbt_parent"] == str(t.user_attrs["pbt_parent"])
        if "pbt_replaced_by" in t.user_attrs:
            assert run.info.run_name.startswith(f"replaced@{max(t.intermediate_values)} · ")
    best = runs[study.best_trial.user_attrs["mlflow_run_id"]]
    assert '"first": 1' in best.data.tags["pbt_schedule"]


@pytest.mark.slow
def test_the_best_schedule_replays_bit_for_bit_and_retrains(evolved):
    """A member's lineage, replayed from scratch (one run, each segment's settings from
    its epoch on, its batch size changing midway), is the curve PBT made: the exploit copied
    weights, optimiser state, generator and epoch across packs. `search retrain` replays it
    on train+val."""
    tmp, _, study = evolved
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    crossed = [t for t in complete  # a lineage whose batch size changed (explore drew it)
               if len({s["params"]["batch_size"] for s in segments(study.trials, t.number)}) > 1]
    best = max(crossed, key=lambda t: len(segments(study.trials, t.number)))
    schedule = segments(study.trials, best.number)
    assert len(schedule) >= 2
    _replay_each(study.trials, [best])
    r = subprocess.run([sys.executable, "-m", "search", "retrain", "--study", "pbt", "--trial",
                        str(best.number)], cwd=tmp,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"through its PBT schedule ({len(schedule)} segments) for 6 epochs" in r.stdout


def test_the_report_draws_each_member_and_names_the_schedule(evolved):
    tmp, _, study = evolved
    r = subprocess.run([sys.executable, "-m", "search", "report", "--study", "pbt"], cwd=tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    page = (tmp / r.stdout.strip().splitlines()[-1]).read_text()
    assert "PBT: validation accuracy per member" in page
    assert f"PBT: the best member (trial {study.best_trial.number}) trained with" in page
    assert "replaced at epoch 2 (PBT: continues as #" in page
    table = subprocess.run([sys.executable, "-m", "search", "table", "--study", "pbt"], cwd=tmp,
                           capture_output=True, text=True, timeout=300).stdout
    assert " · member 0" in table and "at epoch 2" in table  # members and lineage
    status = subprocess.run([sys.executable, "-m", "search", "status"], cwd=tmp,
                            capture_output=True, text=True, timeout=300).stdout
    assert "; PBT: 4 members, " in status and "generation 2" in status


@pytest.mark.slow
def test_a_stopped_population_resumes_and_runs_no_generation_twice(tmp_path):
    # stopped after the step at epoch 2; the resumed population steps at 4 and ends at 6
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=6))
    cmd = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--pbt",
           "--pbt-population", "4", "--pbt-interval", "2", "--seed", "5"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # stop it once the first generation stepped
        time.sleep(0.5)
        if (tmp_path / "search-journal.log").exists() and any(
                "pbt_replaced_by" in t.user_attrs for t in load(tmp_path).trials):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = load(tmp_path).trials
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert sorted(t.user_attrs["pbt_member"] for t in complete) == [0, 1, 2, 3]
    # each member steps once per generation: no (member, start epoch) segment twice
    retried = retried_numbers(trials)  # a stopped attempt's retry carries its attributes
    steps = [(t.user_attrs["pbt_member"], t.user_attrs["pbt_start_epoch"]) for t in trials
             if t.user_attrs.get("pbt_parent") is not None and t.number not in retried]
    assert len(steps) == len(set(steps))
    assert all(max(t.intermediate_values) == 6 for t in complete)
    # resumed members went on from their checkpoints, bit for bit: a replay of each lineage
    # from scratch gives the curve the stopped study made
    _replay_each(trials, complete)
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(load(tmp_path).trials) == len(trials)  # finished: nothing


@pytest.mark.parametrize("name", ["adamw", "sgdm", "lars", "lamb", "localsgd"])
def test_every_shipped_space_runs_under_pbt_as_it_is(name):
    """Searched batch sizes and augmentations are explored by resampling, not refused; only
    localsgd's searched local_workers limits who copies whom, said in one line."""
    from search.inputs.space import load_space

    space = load_space(name)
    pbt = resolve_pbt({}, space, 150, None, ["val_acc"])
    assert "lr" in pbt.mutate
    assert ("batch_size" in pbt.mutate) == any(p.name == "batch_size" for p in space.params)
    assert (copy_limits(space, {}) is None) == (name != "localsgd")


@pytest.mark.parametrize("name", ["pbt-adamw", "pbt-sgdm"])
def test_shipped_pbt_study_files_resolve(name):
    sf = load_study_file(name)
    pbt = resolve_pbt(sf.options["pbt"], sf.space, sf.space.fixed["epochs"],
                      sf.options.get("pruner"), sf.space.objectives)
    assert pbt.population == 16 and set(pbt.mutate) == {"lr", "momentum", "weight_decay", "t_max"}


def _replays(trials, complete, threads):
    """Each finished member's lineage, replayed from scratch (with the workers' threads: a
    reduction's order follows them), gives the curve the study made: every exploit copied its
    donor's weights, optimiser state, generator and epoch."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _replay_each(trials, complete)
    finally:
        torch.set_num_threads(before)


def _replay_each(trials, complete):
    for t in complete:
        schedule = segments(trials, t.number)
        base = t.user_attrs["config"]
        result = replay([(TrainConfig.from_dict({**base, **s["params"]}), s["last"])
                         for s in schedule])
        made = [trials[s["trial"]].intermediate_values[e] for s in schedule
                for e in range(s["first"], s["last"] + 1)]
        assert [h["val_acc"] for h in result.history] == made, t.number


@pytest.mark.slow
def test_a_population_shared_by_two_workers_survives_a_killed_worker(tmp_path):
    """`--workers 2`: each worker trains half the population; generations meet in the storage
    and exploits cross workers through published states. Worker 1 killed mid-generation: its
    members resume elsewhere, the study finishes, no generation runs twice."""
    (tmp_path / "s.yaml").write_text(SPACE.format(epochs=6))
    cmd = [sys.executable, "-m", "search", "run", "--space", "s.yaml", "--pbt",
           "--pbt-population", "4", "--pbt-interval", "2", "--workers", "2", "--seed", "5"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    victim, deadline = None, time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:  # worker 1 holds members 1 and 3
        time.sleep(0.2)
        if not (tmp_path / "search-journal.log").exists():
            continue
        for t in load(tmp_path).trials:
            if (t.state == State.RUNNING and t.user_attrs.get("pbt_member") in (1, 3)
                    and 3 in t.intermediate_values):  # between the generations at 2 and 4
                victim = t
                break
    assert victim is not None, "worker 1 never reached epoch 3"
    pid = victim.user_attrs["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "killed by SIGKILL" in err and "Traceback" not in err, err[-3000:]
    trials = load(tmp_path).trials
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert sorted(t.user_attrs["pbt_member"] for t in complete) == [0, 1, 2, 3]
    assert all(max(t.intermediate_values) == 6 for t in complete)
    member = victim.user_attrs["pbt_member"]  # finished by another worker than the killed one
    assert [t for t in complete if t.user_attrs["pbt_member"] == member
            and t.user_attrs["worker_pid"] != pid]
    retried = retried_numbers(trials)
    steps = [(t.user_attrs["pbt_member"], t.user_attrs["pbt_start_epoch"]) for t in trials
             if t.user_attrs.get("pbt_parent") is not None and t.number not in retried]
    assert steps and len(steps) == len(set(steps))  # each member steps once per generation
    _replays(trials, complete, max(1, (os.cpu_count() or 1) // 2))  # --workers 2's threads
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))  # published states removed
