"""What a log shows per finished trial: one short line (issue 21), for every shipped space."""

import datetime
from pathlib import Path

import optuna

from search.inputs.space import load_space
from search.ui.progress import finished_line

SPACES = sorted(Path(__file__).resolve().parent.parent.joinpath("spaces").glob("*.yaml"))


def _values(space, seed: int) -> dict:
    """A sample of the searched parameters, floats given digits to spare."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    space.sample(trial)  # fixed settings too; the trial's params are the searched ones
    return {k: (v * 1.0123456789 if isinstance(v, float) else v) for k, v in trial.params.items()}


def test_a_finished_trial_line_is_short_for_every_shipped_space():
    assert SPACES
    start = datetime.datetime(2026, 1, 1)
    for path, seed in [(p, seed) for p in SPACES for seed in range(20)]:
        space = load_space(str(path))
        params = _values(space, seed)
        trial = optuna.trial.FrozenTrial(
            number=199, state=optuna.trial.TrialState.COMPLETE, value=0.48213, values=None,
            datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=43210),
            params=params, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={150: 0.48213}, trial_id=1)
        line = finished_line(trial, ["val_acc"], "199/200", "best 0.4988")
        assert len(line) <= 165, (len(line), line)  # the worst seen: 163, LARS
        for name in params:  # every searched value is there, by name
            assert f"{name}=" in line
