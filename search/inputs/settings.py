"""A run's settings: what `search run` resolved from its flags, study file and space, checked
before anything exists, as plain data every worker (a spawned process, a Slurm array task)
receives."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from search import defaults
from search.errors import UserError
from search.inputs.algorithms import MODEL_BASED, PRUNERS, SAMPLERS
from search.inputs.constraints import parse_constraints
from search.inputs.objectives import DEFAULT as DEFAULT_OBJECTIVES
from search.inputs.objectives import parse_objectives, pruner_for
from search.inputs.pbt import KEYS as PBT_KEYS
from search.inputs.pbt import Pbt, resolve_pbt
from search.inputs.space import Space, load_space, parse_space
from search.inputs.studyfile import is_study_file, load_study_file
from search.inputs.values import int_at_least
from trainer.config import TrainConfig, never_averages
from trainer.errors import ConfigError

DEFAULT_RAMP, DEFAULT_TRIALS = defaults.RAMP, defaults.TRIALS


CONFIG_ATTR = "config"  # the trial attribute of a trial's settings that differ from the defaults


def trial_config(trial: Any) -> dict[str, Any]:
    """Every setting a trial (an Optuna FrozenTrial) trained with: the defaults, its recorded
    config, its params."""
    return {**TrainConfig().to_dict(), **trial.user_attrs.get(CONFIG_ATTR, {}), **trial.params}


def trial_setting(space: Space, overrides: dict[str, Any], key: str) -> Any:
    """A setting every trial shares: an override, else the space's fixed value, else the
    trainer's default (`epochs`, `dataset`, `data_root`, ...)."""
    return overrides.get(key, space.fixed.get(key, getattr(TrainConfig, key)))


@dataclass
class RunSettings:
    """Everything a worker process needs to join a study; plain data, so it pickles."""

    space_text: str
    space_path: str  # where the space came from, for messages
    study_name: str
    storage: str
    sampler: str = defaults.SAMPLER
    pruner: str = defaults.PRUNER
    pruner_startup_trials: int = defaults.PRUNER_STARTUP_TRIALS
    pruner_warmup_epochs: int = defaults.PRUNER_WARMUP_EPOCHS
    n_trials: int | None = None  # the study's total (search.study.budget)
    add_trials: int | None = None  # or: this many more than the study holds
    study_total: int | None = None  # resolved by the launcher from the two above
    timeout: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    mlflow_uri: str | None = None
    seed: int | None = None
    heartbeat: int = defaults.HEARTBEAT
    storage_patience: float = defaults.STORAGE_PATIENCE
    stop_within: float = defaults.STOP_WITHIN
    max_retry: int = defaults.MAX_RETRY
    checkpoint_dir: str | None = None
    checkpoint_every: str = "auto"  # auto, epochs or a time (30s): how often a trial checkpoints
    keep_checkpoints: bool = False
    pack: int | str = "auto"  # trials each worker trains together as one model (worker.sizing)
    ramp: int | None = DEFAULT_RAMP  # in flight <= max(ramp, trials heard from) (worker.sizing)
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    constraints: list[str] = field(default_factory=list)  # e.g. val_acc>=0.5 (inputs.constraints)
    fixed_trials: list[dict[str, Any]] = field(default_factory=list)
    table: dict[str, str] | None = None
    command: str | None = None  # the command line, as MLflow's run source
    pbt: dict[str, Any] | None = None  # population-based training (inputs.pbt.Pbt as a dict)
    sample_ahead: str = "auto"  # on, off, auto (on a GPU): the next refill drawn meanwhile

    def params(self, workers: int) -> dict[str, Any]:
        """The study's settings as the parent run's params and the study's attributes."""
        out: dict[str, Any] = {"sampler": self.sampler, "pruner": self.pruner,
                               "objectives": ",".join(self.objectives),
                               "constraints": ",".join(self.constraints) or None,
                               "n_trials": self.n_trials,
                               "timeout": self.timeout, "workers": workers, "pack": self.pack,
                               "ramp": "off" if self.ramp is None else self.ramp,
                               "seed": self.seed, "storage": self.storage,  # redact it
                               "space": self.space_path}
        if self.pruner == "median":
            out.update(pruner_startup_trials=self.pruner_startup_trials,
                       pruner_warmup_epochs=self.pruner_warmup_epochs)
        out.update({f"override.{k}": v for k, v in self.overrides.items()})
        if self.pbt is not None:
            out.update({f"pbt_{k}": ",".join(v) if isinstance(v, list) else v
                        for k, v in self.pbt.items()})
        return {k: v for k, v in out.items() if v is not None}

    def load_space(self) -> Space:
        return parse_space(self.space_text, self.space_path)

    def trial_setting(self, space: Space, key: str) -> Any:
        return trial_setting(space, self.overrides, key)


@dataclass
class Sources:
    """Where a run's settings come from: a space (and maybe a study file) and the flags."""

    space: Space
    name: str
    options: dict[str, Any]  # the study file's keys (sampler, pruner, n_trials, pack, ...)
    overrides: dict[str, Any]
    fixed: list[dict[str, Any]]
    table: dict[str, str] | None
    where: str  # "FILE: " when a study file gave the settings, for messages

    def pick(self, flag: Any, key: str, default: Any) -> Any:
        """The flag, else the study file's key, else the default."""
        return flag if flag is not None else self.options.get(key, default)


def read_sources(args: argparse.Namespace, blocks: frozenset[str] | set[str] = frozenset()) -> Sources:
    """The space and study file the flags name, with the flags' overrides of trial settings."""
    if is_study_file(args.study) and not args.space:
        sf = load_study_file(args.study, blocks)
        sources = Sources(sf.space, sf.name, sf.options, dict(sf.overrides),
                          [vars(f) for f in sf.fixed_trials], sf.table, f"{sf.path}: ")
    elif args.space:
        space = load_space(args.space)
        sources = Sources(space, args.study or space.name, {}, {}, [], None, "")
    else:
        raise UserError("give --space SPACE.yaml, or --study with a study file (studies/NAME.yaml)")
    sources.overrides.update({k: v for k, v in {
        "epochs": args.epochs, "dataset": args.dataset, "data_root": args.data_root,
        "seed": args.seed, "device": args.device, "precision": args.precision,
        "model": getattr(args, "model", None),
    }.items() if v is not None})
    return sources


def check_numbers(args: argparse.Namespace, src: Sources) -> None:
    """Every count and duration, from a flag or the study file: one line naming its source."""
    for flag, key, low in (("--workers", None, 1), ("--heartbeat", None, 1),
                           ("--max-retry", None, 0), ("--max-restarts", None, 0),
                           ("--n-trials", "n_trials", 0),
                           ("--pruner-startup-trials", "pruner_startup_trials", 0),
                           ("--pruner-warmup-epochs", "pruner_warmup_epochs", 0)):
        attr = flag[2:].replace("-", "_")
        value = getattr(args, attr) if key is None else src.pick(getattr(args, attr), key, None)
        if value is None:
            continue
        source = flag if key is None or key not in src.options else f"{src.where}{key}"
        if not int_at_least(value, low):
            raise UserError(f"{source}: expected an integer >= {low}, got {value!r}")
    timeout = src.pick(args.timeout, "timeout", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout < float("inf")):
        source = "--timeout" if args.timeout is not None else f"{src.where}timeout"
        raise UserError(f"{source}: expected a number of seconds > 0, got {timeout!r}")


def check_trials(args: argparse.Namespace, src: Sources) -> None:
    """The flags' overrides against the space, and every fixed trial as a whole configuration."""
    if src.overrides:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in src.overrides.items()
                         if getattr(args, k, None) is not None) or f"{src.where}overrides"
        src.space.check_with(src.overrides, flags)
    for row in src.fixed:
        where = f"{src.where}fixed_trials {row['label']}"
        try:
            config = TrainConfig.from_dict({**src.space.fixed, **src.overrides, **row["params"]})
        except ConfigError as exc:
            raise UserError(f"{where}: {exc}") from None
        if (steps := never_averages(config)) is not None:
            raise UserError(f"{where}: local_steps {config.local_steps} exceeds the ~{steps} "
                            f"steps it runs ({config.epochs} epochs of {config.dataset}): its "
                            "workers would never average; lower local_steps or raise epochs")


def resolve(args: argparse.Namespace, src: Sources, storage: str, command: str) -> RunSettings:
    """The run's settings from checked sources (flags over the study file over the space)."""
    pick = src.pick
    objectives = (parse_objectives(args.objective, "--objective") if args.objective
                  else src.options.get("objectives", src.space.objectives))
    constraints = (parse_constraints(args.constraint, "--constraint") if args.constraint
                   else src.options.get("constraints", src.space.constraints))
    timeout = pick(args.timeout, "timeout", None)
    n_trials = pick(args.n_trials, "n_trials", None)
    pbt = pbt_settings(args, src, objectives)
    add_trials = getattr(args, "add_trials", None)
    if add_trials is not None and args.n_trials is not None:
        raise UserError("--add-trials with --n-trials: give one (--n-trials N is the study's "
                        "total, --add-trials K is K more than it holds)")
    if add_trials is not None:  # over a study file's n_trials, as any flag is
        n_trials = None
    if n_trials is None and timeout is None and add_trials is None:
        n_trials = max(DEFAULT_TRIALS, len(src.fixed))
    settings = RunSettings(
        space_text=src.space.text, space_path=str(src.space.path), study_name=src.name,
        storage=storage, sampler=pick(args.sampler, "sampler", "tpe"),
        pruner=pruner_for(pick(args.pruner, "pruner", "median"), objectives, announce=True),
        objectives=objectives, constraints=constraints,
        pruner_startup_trials=pick(args.pruner_startup_trials, "pruner_startup_trials", defaults.PRUNER_STARTUP_TRIALS),
        pruner_warmup_epochs=pick(args.pruner_warmup_epochs, "pruner_warmup_epochs", 0),
        n_trials=n_trials, add_trials=add_trials, timeout=timeout, overrides=src.overrides, mlflow_uri=args.mlflow_uri,
        seed=args.seed, fixed_trials=src.fixed, table=src.table, heartbeat=args.heartbeat,
        max_retry=args.max_retry, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        storage_patience=args.storage_patience, stop_within=args.stop_within,
        keep_checkpoints=args.keep_checkpoints, pack=pick(args.pack, "pack", "auto"),
        ramp=pick(args.ramp, "ramp", DEFAULT_RAMP), command=command,
        sample_ahead=getattr(args, "sample_ahead", None) or "auto",
    )
    if settings.sample_ahead == "on" and (settings.sampler not in MODEL_BASED or pbt is not None):
        raise UserError(f"--sample-ahead: only with a model-based sampler ({', '.join(MODEL_BASED)}) "
                        f"and without --pbt; this run has sampler {settings.sampler}"
                        + (" and PBT" if pbt is not None else ""))
    if pbt is not None:  # the population is the pack and the budget; PBT replaces pruning
        settings.pbt, settings.pruner = pbt.as_dict(), "none"
        settings.n_trials, settings.pack, settings.ramp = None, pbt.population, None
    if settings.sampler not in SAMPLERS or settings.pruner not in PRUNERS:
        raise UserError(f"sampler {settings.sampler!r} / pruner {settings.pruner!r}: expected "
                        f"one of {', '.join(SAMPLERS)} / {', '.join(PRUNERS)}")
    return settings


def pbt_settings(args: argparse.Namespace, src: Sources, objectives: list[str]) -> Pbt | None:
    """`--pbt` and its flags over the study file's `pbt:` block (which alone also enables it),
    checked; None without either."""
    block = src.options.get("pbt")
    if not getattr(args, "pbt", False) and block is None:
        return None
    merged = dict(block or {})
    for key in PBT_KEYS:
        flag = getattr(args, f"pbt_{key}", None)
        if flag is not None:
            merged[key] = flag
            merged.pop(f"_source_{key}", None)
    n_trials = src.pick(args.n_trials, "n_trials", None)
    if getattr(args, "add_trials", None) is not None:
        raise UserError("--add-trials: with PBT the budget is the population (--pbt-population) "
                        "x the trials' epochs; drop it")
    if n_trials is not None:
        source = "--n-trials" if args.n_trials is not None else f"{src.where}n_trials"
        raise UserError(f"{source}: with PBT the budget is the population (--pbt-population) x "
                        "the trials' epochs; drop it")
    epochs = int(trial_setting(src.space, src.overrides, "epochs"))
    return resolve_pbt(merged, src.space, epochs, src.pick(args.pruner, "pruner", None),
                       objectives)
