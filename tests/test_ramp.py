"""`--ramp` (default 10): a worker never has more trials in flight than max(ramp, trials the
study has heard from), less those other workers train -- so a wide pack is not proposed blind.
Its rule against a study's states, and a real `search run --pack 4 --ramp 2` whose trials'
start and end times show the width growing only as results come in."""

import optuna
import pytest

from search.worker.sizing import in_flight_limit

State = optuna.trial.TrialState
SPACE = """
fixed: {optimizer: sgdm, epochs: 2, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
"""


def _study(finished: int, running: int) -> optuna.Study:
    study = optuna.create_study()
    for i in range(finished):
        study.add_trial(optuna.trial.create_trial(value=float(i), state=State.COMPLETE))
    for _ in range(running):
        study.ask()
    return study


def test_the_ramp_widens_with_the_trials_heard_from_and_counts_other_workers():
    assert in_flight_limit(_study(0, 0), 8, None, 0) == 8  # off: the whole pack
    assert in_flight_limit(_study(0, 0), 8, 10, 0) == 8  # a ramp wider than the pack
    assert in_flight_limit(_study(0, 0), 8, 2, 0) == 2
    assert in_flight_limit(_study(5, 0), 8, 2, 0) == 5
    assert in_flight_limit(_study(50, 0), 8, 2, 0) == 8
    assert in_flight_limit(_study(5, 2), 8, 2, 2) == 5  # its own two trials are in the five
    assert in_flight_limit(_study(5, 3), 8, 2, 0) == 2  # three trained by another worker
    assert in_flight_limit(_study(0, 6), 8, 2, 0) == 1  # never idle


def _in_flight_at_each_start(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, int]]:
    """(trials in flight just after it started, trials finished before it) for each trial."""
    out = []
    for t in sorted(trials, key=lambda t: t.datetime_start):
        flying = sum(u.datetime_start <= t.datetime_start < u.datetime_complete for u in trials)
        heard = sum(u.datetime_complete <= t.datetime_start for u in trials)
        out.append((flying, heard))
    return out


@pytest.mark.slow
def test_a_packed_run_widens_only_as_results_come_in(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    storage = f"sqlite:///{tmp_path}/s.db"
    r = cli("run", "--space", "s.yaml", "--study", "ramped", "--n-trials", "8", "--pack", "4",
            "--ramp", "2", "--pruner", "none", "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = optuna.load_study(study_name="ramped", storage=storage).trials
    assert [t.state for t in trials] == [State.COMPLETE] * 8
    starts = _in_flight_at_each_start(trials)
    assert all(flying <= max(2, heard) for flying, heard in starts), starts
    # two at first, two more once those are heard from, then the whole pack of four
    assert [heard for _, heard in starts] == [0, 0, 2, 2, 4, 4, 4, 4]
    assert max(flying for flying, _ in starts) == 4
    settings = optuna.load_study(study_name="ramped", storage=storage).user_attrs["settings"]
    assert "pack=4 ramp=2" in settings  # what the dashboard shows

    r = cli("run", "--space", "s.yaml", "--study", "unramped", "--n-trials", "4", "--pack", "4",
            "--ramp", "off", "--pruner", "none", "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    starts = _in_flight_at_each_start(optuna.load_study(study_name="unramped",
                                                        storage=storage).trials)
    assert [heard for _, heard in starts] == [0, 0, 0, 0]  # all four asked together


def test_bad_ramps_are_one_line(cli, tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    for bad in ("0", "wide", "-1"):
        r = cli("run", "--space", "s.yaml", "--ramp", bad)
        assert r.returncode == 2 and "--ramp" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "f.yaml").write_text("name: f\nspace: s.yaml\nramp: 0\n")
    r = cli("run", "--study", "f.yaml")
    assert r.returncode != 0 and "ramp: expected off or an integer >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr
