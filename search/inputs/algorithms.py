"""Optuna's samplers and pruners by the names the CLI and study files use."""

from __future__ import annotations

import warnings

import optuna

from search import defaults, optuna_seam
from search.errors import UserError
from search.inputs.space import Space

State = optuna.trial.TrialState
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "gp", "nsga2")
MODEL_BASED = ("tpe", "gp", "cmaes")  # samplers whose ask reads the whole study (--sample-ahead)
PRUNERS = ("median", "hyperband", "sha", "none")


def make_sampler(name: str, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group: models lr jointly with the optimiser, and conditional
        # parameters (t_max only with cosine, ...) as their own groups
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna_seam.group_space_once_per_trial(optuna.samplers.TPESampler(
                seed=seed, constant_liar=True, multivariate=True, group=True))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "nsga2":  # the classic multi-objective evolutionary sampler
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise UserError(f"--sampler: unknown {name!r}; expected one of {', '.join(SAMPLERS)}")


class RoundPruner(optuna.pruners.BasePruner):
    """A percentile pruner (median) that reads the study's complete trials once per round
    instead of once per trial, and takes their percentile at a step once per round: the worker
    loop calls `new_round()` at each epoch boundary and after each trial it completes, so a
    pack of P trials costs one read and one pass over the study per step, not P, however large
    the study grows. Decisions are those of the pruner it wraps."""

    def __init__(self, inner: optuna.pruners.PercentilePruner):
        self.inner = inner
        self.complete: list[optuna.trial.FrozenTrial] | None = None
        self.percentiles: dict = {}

    def new_round(self) -> None:
        self.complete = None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self.complete is None:
            self.complete = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
            self.percentiles = {}
        with optuna_seam.percentiles_once(self.percentiles):
            return self.inner.prune(_WithComplete(study, self.complete), trial)


class _WithComplete:
    """The study as a pruner sees it, its complete trials those of this round."""

    def __init__(self, study: optuna.Study, complete: list[optuna.trial.FrozenTrial]):
        self._study, self._complete = study, complete

    def get_trials(self, deepcopy: bool = True, states=None):
        if not deepcopy and states is not None and tuple(states) == (State.COMPLETE,):
            return self._complete
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str):
        return getattr(self._study, name)


def make_pruner(name: str, epochs: int, startup_trials: int = defaults.PRUNER_STARTUP_TRIALS,
                warmup_epochs: int = 0) -> optuna.pruners.BasePruner:
    if name == "median":
        return RoundPruner(optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                                       n_warmup_steps=warmup_epochs))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner: unknown {name!r}; expected one of {', '.join(PRUNERS)}")
