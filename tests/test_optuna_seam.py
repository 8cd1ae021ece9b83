"""Optuna's private internals we rely on (search/optuna_seam.py) still exist and still behave as
the seam says; and importing our modules changes nothing outside them. An Optuna release that
renames one of them fails here, by name, instead of in a worker."""

import inspect
import os
import re
import subprocess
import sys

import optuna
import pytest

from search.optuna_seam import reads as optuna_seam
from search.optuna_seam import resilient
from search.optuna_seam import writes as optuna_writes

State = optuna.trial.TrialState


@pytest.fixture
def study(tmp_path):
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", study_name="s")


def test_a_trial_is_read_and_beaten_by_its_storage_id(study):
    trial = study.ask()
    assert isinstance(optuna_seam.storage_of(study), optuna.storages.BaseStorage)
    assert optuna_seam.get_trial(study, trial).number == trial.number
    beat = optuna_seam.heartbeat_thread(trial, study)
    beat.start()
    beat.join()
    study.tell(trial, 1.0)
    assert optuna_seam.get_trial(study, trial).state == State.COMPLETE


def test_another_process_trial_is_failed_once(study):
    trial = study.ask()
    frozen = optuna_seam.get_trial(study, trial)
    assert optuna_seam.fail_if_running(study, frozen) is True
    assert optuna_seam.fail_if_running(study, frozen) is False  # someone ended it first


def test_only_a_waiting_trial_is_asked(study):
    assert optuna_seam.ask_waiting(study) is None and study.trials == []  # nothing created
    study.enqueue_trial({"x": 0.5})
    trial = optuna_seam.ask_waiting(study)
    assert trial.suggest_float("x", 0.0, 1.0) == 0.5
    assert optuna_seam.get_trial(study, trial).state == State.RUNNING
    assert optuna_seam.ask_waiting(study) is None  # claimed once


def test_grid_sampler_may_stop_inside_our_optimize_loop(study):
    grid = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [0, 1]}))
    with optuna_seam.optimize_loop(grid):
        for _ in range(2):
            t = grid.ask()
            t.suggest_categorical("x", [0, 1])
            grid.tell(t, 0.0)
        assert optuna_seam.stop_requested(grid)  # the grid is done: GridSampler called stop()
    assert not grid._thread_local.in_optimize_loop


def test_a_trial_started_with_values_is_ours_and_suggests_them(study):
    study.enqueue_trial({"x": 0.5})  # a waiting trial must not take its place
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    trial = optuna_seam.start_trial(study, {"x": 0.25}, {"x": dist}, {"pbt_parent": 3})
    assert trial.suggest_float("x", 0.0, 1.0) == 0.25 and trial.user_attrs == {"pbt_parent": 3}
    assert optuna_seam.get_trial(study, trial).state == State.RUNNING
    study.tell(trial, 1.0)
    assert [t.state for t in study.trials] == [State.WAITING, State.COMPLETE]


def test_every_private_call_of_optunas_cache_is_one_we_retry():
    source = inspect.getsource(optuna.storages._cached_storage)
    called = set(re.findall(r"self\._backend\.(_[a-z_]+)\(", source))
    ours = set(resilient.CACHED_STORAGE_CALLS) | {resilient.STALE_TRIALS_QUERY}
    assert called <= ours, f"Optuna's cache now also calls {sorted(called - ours)}"
    for name in ours:
        assert inspect.isfunction(getattr(optuna.storages.RDBStorage, name, None)), name


def test_importing_search_changes_nothing_outside_it():
    code = (
        "import os, optuna\n"
        "before = dict(os.environ)\n"
        "import search.cli, search.cli.run, search.cli.inspect, search.cli.retrain\n"
        "import search.study.storage, search.tracking.client, search.launch.slurm\n"
        "import search.optuna_seam.resilient as s\n"
        "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n"
        "assert 'get_all_trials' not in vars(s.ResilientRDBStorage)\n"
        "s.resilient_storage()\n"
        "assert 'get_all_trials' in vars(s.ResilientRDBStorage)\n"
        "assert not hasattr(optuna.storages.RDBStorage.get_all_trials, '__wrapped__')\n"
    )
    # MLflow's telemetry session (its own variable, set at import unless disabled, as in CI)
    env = {k: v for k, v in os.environ.items() if k != "_MLFLOW_TELEMETRY_SESSION_ID"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert r.returncode == 0, r.stderr[-2000:]


def _url(kind: str, tmp_path, request) -> str:
    """SQLite, PostgreSQL (a multi-row upsert of its own dialect) or the journal file."""
    if kind == "postgres":
        return request.getfixturevalue("postgres").create_database(f"seam{abs(hash(tmp_path))}")
    return f"sqlite:///{tmp_path}/s.db" if kind == "database" else str(tmp_path / "j.log")


@pytest.mark.parametrize("kind", ["database", "postgres", "journal"])
def test_a_pack_epoch_is_written_at_once(tmp_path, kind, request):
    from search.study.storage import open_storage

    url = _url(kind, tmp_path, request)
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    a, b = study.ask(), study.ask()
    assert optuna_writes.write_reports(study, [(a, 1, 0.5), (b, 1, 0.25)], [(a, "run", "r1")])
    assert [t.intermediate_values for t in study.get_trials()] == [{1: 0.5}, {1: 0.25}]
    assert study.get_trials()[0].user_attrs == {"run": "r1"} and a.user_attrs == {"run": "r1"}
    assert optuna_seam.reported(a, 1) and not optuna_seam.reported(a, 2)  # what should_prune reads
    study.tell(b, 0.25)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # b no longer runs
        optuna_writes.write_reports(study, [(a, 2, 0.7), (b, 2, 0.1)], [])
    if kind != "journal":  # one transaction: nothing of it landed
        assert study.get_trials()[0].intermediate_values == {1: 0.5}


@pytest.mark.parametrize("kind", ["database", "postgres", "journal"])
def test_a_trial_start_is_written_at_once(tmp_path, kind, request):
    from search.study.storage import open_storage

    url = _url(kind, tmp_path, request)
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    study.enqueue_trial({"x": 0.5})
    trial = optuna_seam.ask_new(study)  # new, though one waits
    assert trial.number == 1 and [t.state for t in study.get_trials()] == [State.WAITING, State.RUNNING]
    assert optuna_seam.frozen(trial) == study._storage.get_trial(trial._trial_id)  # made, not read
    bystander = optuna_seam.ask_new(study)
    with optuna_writes.one_write(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("host", "before")
        trial.set_user_attr("host", "h")  # the last value stands
        study._storage.set_trial_system_attr(trial._trial_id, "liar", [x])  # as TPE writes
        bystander.set_user_attr("elsewhere", 1)  # another trial's write: straight through
        assert trial.params == {"x": x} and trial.user_attrs == {"host": "h"}  # read back
        stored = optuna.load_study(storage=open_storage(url), study_name="s").trials
        assert stored[1].params == {} and stored[1].user_attrs == {}  # nothing written yet
        assert "liar" not in stored[1].system_attrs
        assert stored[2].user_attrs == {"elsewhere": 1}
    stored = optuna.load_study(storage=open_storage(url), study_name="s").trials[1]
    assert stored.params == {"x": x} and stored.user_attrs == {"host": "h"}
    assert stored.system_attrs["liar"] == [x]
    assert "set_trial_param" not in vars(study._storage)  # the storage as it was
    other = optuna_seam.ask_new(study)
    with pytest.raises(ValueError):  # the study's distribution of x is checked, as suggest does
        with optuna_writes.one_write(other):
            other.suggest_int("x", 0, 3)
    if kind != "journal":  # one transaction: nothing of it landed
        assert optuna.load_study(storage=open_storage(url), study_name="s").trials[3].params == {}
    fresh = optuna.load_study(storage=open_storage(url), study_name="s")  # no distribution known
    late = optuna_seam.ask_new(fresh)
    with pytest.raises(ValueError):  # checked against the one stored
        with optuna_writes.one_write(late):
            late.suggest_int("x", 0, 3)
    retry = study.ask()  # the waiting one, its system attributes as made
    assert retry.number == 0 and optuna_seam.frozen(retry).system_attrs["fixed_params"] == {"x": 0.5}


@pytest.mark.parametrize("kind", ["database", "postgres", "journal"])
def test_a_trial_end_is_written_at_once(tmp_path, kind, request):
    from search.study.storage import open_storage

    url = _url(kind, tmp_path, request)
    study = optuna.create_study(storage=open_storage(url), study_name="s", direction="maximize")
    a, b = optuna_seam.ask_new(study), optuna_seam.ask_new(study)
    a.report(0.25, 1)
    a.report(0.5, 2)
    with optuna_writes.one_write(a):
        a.set_user_attr("pruned_reason", "pruned at epoch 2")
        optuna_seam.tell(study, a, None, State.PRUNED)
        stored = optuna.load_study(storage=open_storage(url), study_name="s").trials[0]
        assert stored.state == State.RUNNING and stored.user_attrs == {}  # nothing yet
    stored = optuna.load_study(storage=open_storage(url), study_name="s").trials[0]
    assert stored.state == State.PRUNED and stored.value == 0.5  # its last report
    assert stored.user_attrs == {"pruned_reason": "pruned at epoch 2"} and stored.datetime_complete
    elsewhere = optuna.load_study(storage=open_storage(url), study_name="s")
    assert optuna_seam.fail_if_running(elsewhere, elsewhere.trials[1])  # taken over meanwhile
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        with optuna_writes.one_write(b):
            b.set_user_attr("fail_reason", "late")
            optuna_seam.tell(study, b, [1.0], State.COMPLETE)
    stored = optuna.load_study(storage=open_storage(url), study_name="s").trials[1]
    assert stored.state == State.FAIL and stored.value is None
    if kind != "journal":  # one transaction: nothing of it landed
        assert stored.user_attrs == {}


@pytest.mark.parametrize("kind", ["database", "postgres"])
def test_a_refill_is_created_and_started_in_one_write_each(tmp_path, kind, request):
    import sqlalchemy

    from search.study.storage import open_storage

    url = _url(kind, tmp_path, request)
    study = optuna.create_study(storage=open_storage(url, heartbeat=60), study_name="s")
    elsewhere = optuna.load_study(storage=open_storage(url, heartbeat=60), study_name="s")
    elsewhere.ask()  # another worker's trial first: numbered as Optuna numbers them
    made = optuna_writes.create_trials(study, 3)
    assert [t.number for t in made] == [1, 2, 3] and {t.state for t in made} == {State.RUNNING}
    assert elsewhere.ask().number == 4
    with sqlalchemy.create_engine(url).connect() as db:  # a first beat each: a killed worker's
        beaten = {r[0] for r in db.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}
    assert {t._trial_id for t in made} <= beaten  # trials go stale, not RUNNING for ever

    def stored() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(storage=open_storage(url), study_name="s").trials

    with optuna_seam.reads_once(study), optuna_writes.writes_together(study):
        first = optuna_seam.ask_new(study, made[0])
        assert first.number == 1 and optuna_seam.frozen(first) == study._storage.get_trial(made[0]._trial_id)
        with optuna_writes.one_write(first):
            x = first.suggest_float("x", 0.0, 1.0)
            first.set_user_attr("host", "h")
        assert study.get_trials()[1].params == {"x": x}  # the next one's sampler sees it
        # a claim of a waiting trial that `ask` read as waiting from a stale cache: refused, as ever
        assert not study._storage.set_trial_state_values(made[0]._trial_id, state=State.RUNNING)
        assert stored()[1].params == {} and stored()[1].user_attrs == {}  # not written yet
        bad = optuna_seam.ask_new(study, made[1])
        with pytest.raises(ValueError), optuna_writes.one_write(bad):  # an impossible trial
            bad.suggest_float("x", 0.0, 1.0)
            bad.set_user_attr("fail_reason", "invalid configuration")
            raise ValueError("invalid")
        assert stored()[2].user_attrs == {"fail_reason": "invalid configuration"}  # at once
        study.tell(bad, state=State.FAIL)  # after its start, not before
        last = optuna_seam.ask_new(study, made[2])
        with optuna_writes.one_write(last):
            last.suggest_float("x", 0.0, 1.0)
    trials = stored()
    assert trials[1].params == {"x": x} and trials[1].user_attrs == {"host": "h"}
    assert trials[2].state == State.FAIL and "x" in trials[3].params
    assert "set_trial_param" not in vars(study._storage)  # the storage as it was
    spare = optuna_writes.create_trials(study, 2)
    optuna_writes.hand_back(study, spare[1:])  # the budget ended inside a refill
    assert [t.state for t in stored()[5:]] == [State.RUNNING, State.WAITING]
    assert elsewhere.ask().number == spare[1].number  # the next ask takes it


def test_a_refill_on_the_journal_is_created_one_by_one(tmp_path):
    from search.study.storage import open_storage

    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.log")), study_name="s")
    assert optuna_writes.create_trials(study, 3) is None and study.trials == []
    with optuna_writes.writes_together(study):  # no batch there: each start writes at its end
        trial = optuna_seam.ask_new(study)
        with optuna_writes.one_write(trial):
            x = trial.suggest_float("x", 0.0, 1.0)
        assert optuna.load_study(storage=open_storage(str(tmp_path / "j.log")),
                                 study_name="s").trials[0].params == {"x": x}


def test_a_batch_samples_from_one_read_and_its_own_writes(tmp_path):
    from search.study.storage import open_storage

    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    elsewhere = optuna.load_study(storage=open_storage(url), study_name="s")  # another worker
    a, b = optuna_seam.ask_new(study), optuna_seam.ask_new(study)
    with optuna_seam.reads_once(study):
        assert len(study.get_trials()) == 2  # the one read
        elsewhere.ask()
        with optuna_writes.one_write(a):
            x = a.suggest_float("x", 0.0, 1.0)
            a.set_user_attr("host", "h")
        seen = study.get_trials()
        assert len(seen) == 2  # the other worker's trial: at the next read
        assert seen[0].params == {"x": x} and seen[0].user_attrs == {"host": "h"}  # written through
        assert seen[1].params == {}
    assert len(study.get_trials()) == 3 and study.get_trials()[0].params == {"x": x}
    optuna_seam.tell(study, b, [1.0], State.COMPLETE)
    assert study.get_trials()[1].value == 1.0
    optuna_seam.tell(study, a, None, State.PRUNED)  # its last report, if any, is its value
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        optuna_seam.tell(study, a, None, State.FAIL)  # once: the storage's own check


def test_tpe_adds_each_trial_to_its_groups_once_and_samples_as_optuna_does():
    def objective(trial):
        kind = trial.suggest_categorical("kind", ["a", "b"])  # two conditional groups
        x = trial.suggest_float("x" if kind == "a" else "y", 0.0, 1.0)
        return x + trial.suggest_float("z", -1.0, 1.0)

    def run(sampler):
        study = optuna.create_study(sampler=sampler)
        study.optimize(objective, n_trials=30)
        return study, sampler

    def tpe():
        return optuna.samplers.TPESampler(seed=3, n_startup_trials=5, multivariate=True, group=True)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    theirs, _ = run(tpe())
    ours, sampler = run(optuna_seam.group_space_once_per_trial(tpe()))
    assert [t.params for t in ours.trials] == [t.params for t in theirs.trials]
    space = sampler._group_decomposed_search_space
    assert len(space._added) == 29  # every complete trial once (the last is told after its ask)
    optunas = optuna.search_space.group_decomposed._GroupDecomposedSearchSpace().calculate(theirs)
    assert space.calculate(ours).search_spaces == optunas.search_spaces  # the same groups, in order
    assert sorted(map(sorted, optunas.search_spaces)) == [["kind", "z"], ["x"], ["y"]]
    random = optuna.samplers.RandomSampler()
    assert optuna_seam.group_space_once_per_trial(random) is random


def test_the_round_pruner_decides_as_the_median_pruner_from_one_percentile_per_step(monkeypatch):
    import random

    from optuna.pruners import _percentile

    from search.inputs.algorithms import make_pruner

    rng = random.Random(0)
    study = optuna.create_study(direction="maximize")
    study.add_trials([optuna.trial.create_trial(
        value=rng.random(), intermediate_values={s: rng.random() for s in (1, 2, 3)})
        for _ in range(300)])
    computed = []
    compute = _percentile._get_percentile_intermediate_result_over_trials
    monkeypatch.setattr(_percentile, "_get_percentile_intermediate_result_over_trials",
                        lambda *a: computed.append(a[2]) or compute(*a))
    ours, optunas = make_pruner("median", 3), optuna.pruners.MedianPruner()
    running = [optuna.trial.create_trial(state=State.RUNNING, intermediate_values={
        s: rng.random() for s in range(1, step + 1)}) for step in (1, 2) for _ in range(40)]
    decisions = [ours.prune(study, t) for t in running]
    assert sorted(computed) == [1, 2]  # once per step for the round, not per trial
    assert decisions == [optunas.prune(study, t) for t in running] and any(decisions)
    assert not all(decisions)
    computed.clear()
    ours.prune(study, running[0])
    assert computed == []  # the same round
    ours.new_round()
    ours.prune(study, running[0])
    assert computed == [1]  # a new round: afresh
    assert _percentile._get_percentile_intermediate_result_over_trials is not compute  # ours undone


def test_ask_new_and_tell_on_an_in_memory_study():
    study = optuna.create_study()  # benchmarks run the worker loop on Optuna's in-memory storage
    trial = optuna_seam.ask_new(study)
    with optuna_writes.one_write(trial):
        trial.suggest_float("x", 0.0, 1.0)
        optuna_seam.tell(study, trial, [0.5], State.COMPLETE)
    assert study.trials[0].state == State.COMPLETE and study.trials[0].value == 0.5
