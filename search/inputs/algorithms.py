"""Optuna's samplers and pruners by the names the CLI and study files use."""

from __future__ import annotations

import warnings

import optuna

from search.errors import UserError
from search.inputs.space import Space

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "gp", "nsga2")
PRUNERS = ("median", "hyperband", "sha", "none")


def make_sampler(name: str, space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group: models lr jointly with the optimiser, and conditional
        # parameters (t_max only with cosine, ...) as their own groups
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True,
                                              group=True)
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


def make_pruner(name: str, epochs: int, startup_trials: int = 5,
                warmup_epochs: int = 0) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                           n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner: unknown {name!r}; expected one of {', '.join(PRUNERS)}")
