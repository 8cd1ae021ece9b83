"""`search run` (create or resume a study, launch its workers) and `search worker` (one task of
a `--slurm` study). `cmd_run` reads linearly: the sources, their checks, the preflight, the
settings, then the launcher."""

from __future__ import annotations

import argparse
import shlex
import sys

from search import defaults
from search.cli.args import (
    MODEL_HELP,
    checkpoint_cadence,
    dataset_name,
    model_spec,
    pack_size,
    ramp_size,
    storage_flag,
)
from search.errors import UserError
from search.inputs.algorithms import PRUNERS, SAMPLERS
from search.inputs.pbt import FACTORS, Pbt, copy_limits
from search.inputs.settings import (
    DEFAULT_RAMP,
    check_numbers,
    check_trials,
    read_sources,
    resolve,
    trial_setting,
)
from search.inputs.values import positive_float, positive_int
from search.launch import plugins
from search.logs import quiet_libraries, say
from search.study.storage import storage_url
from trainer.catalogue import DATASETS
from trainer.config import PRECISIONS


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="create or resume a study and run trials")
    p.add_argument("--space", help="space YAML file, or a name in spaces/")
    p.add_argument("--study", help="a study file (studies/NAME.yaml, or a bare name in "
                   "studies/), or with --space the study's name (default: the space's name)")
    storage_flag(p)
    p.add_argument("--n-trials", type=int, help="the study's total across commands and machines: "
                   f"a rerun finishes the study, a finished study runs nothing (default {defaults.TRIALS})")
    p.add_argument("--add-trials", type=positive_int, help="run this many more trials than the "
                   "study holds (raises its total)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument("--sampler", choices=SAMPLERS, help=f"default: the study file's, else {defaults.SAMPLER}")
    p.add_argument("--pruner", choices=PRUNERS, help=f"default: the study file's, else {defaults.PRUNER}")
    p.add_argument("--objective", help="what the study optimises, comma-separated: val_acc "
                   "(default), seconds, comm_rounds, epochs; several make a Pareto front "
                   "(default: the study file's, else the space's)")
    p.add_argument("--constraint", help="what a trial must reach to count, comma-separated: "
                   "METRIC>=X or METRIC<=X, e.g. \"val_acc>=0.5\" (infeasible trials stay off "
                   "the best trial and the Pareto front; default: the study file's, else the "
                   "space's)")
    p.add_argument("--pruner-startup-trials", type=int,
                   help="median pruner: trials finished before pruning starts (default "
                   f"{defaults.PRUNER_STARTUP_TRIALS})")
    p.add_argument("--pruner-warmup-epochs", type=int,
                   help="median pruner: epochs of a trial before it can be pruned (default "
                   f"{defaults.PRUNER_WARMUP_EPOCHS})")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--pack", type=pack_size, help="trials each worker trains together as one "
                   "stacked model, or auto: as many as its GPU holds (at most 64 and the trials "
                   "left), 1 on a CPU (default: the study file's, else auto)")
    p.add_argument("--ramp", type=ramp_size, help="never more trials in flight than N or the "
                   "trials the study has heard from, whichever is more, so a wide pack is not "
                   f"proposed blind; off: always the whole pack (default {DEFAULT_RAMP})")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--dataset", type=dataset_name, help=f"{', '.join(DATASETS)}, or folder:PATH "
                   "(PATH/train/CLASS/*.png|jpg, optional PATH/test/CLASS/...)")
    p.add_argument("--data-root")
    p.add_argument("--model", type=model_spec, help=MODEL_HELP + "; over the space's")
    p.add_argument("--seed", type=int, help="training seed, and the sampler's seed")
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                   "else MLflow's default ./mlflow.db)")
    p.add_argument("--heartbeat", type=int, default=defaults.HEARTBEAT,
                   help=f"seconds between trial heartbeats on a database storage (default {defaults.HEARTBEAT})")
    p.add_argument("--storage-patience", type=positive_float, default=defaults.STORAGE_PATIENCE,
                   help="seconds a database storage may stay silent (a restart, a failover) "
                   f"before the command stops, its trials left to resume (default {defaults.STORAGE_PATIENCE:g})")
    p.add_argument("--stop-within", type=positive_float, default=defaults.STOP_WITHIN,
                   help="seconds a signalled worker may take to stop: it saves a mid-epoch "
                   f"checkpoint at the next step unless its epoch ends sooner (default {defaults.STOP_WITHIN:g})")
    p.add_argument("--max-retry", type=int, default=defaults.MAX_RETRY,
                   help=f"times a trial whose worker died or was stopped is re-queued (default {defaults.MAX_RETRY})")
    p.add_argument("--checkpoint-dir", help="per-epoch trial checkpoints, shared by all workers "
                   "(default ./checkpoints)")
    p.add_argument("--checkpoint-every", type=checkpoint_cadence, default="auto",
                   help="how often a trial checkpoints: auto (every epoch while that costs "
                   "under 2%% of the worker's time, else less often, at least once a minute), "
                   "every N epochs, or a time such as 30s or 5m (written in the background; a "
                   "crash loses at most this much of a trial; default auto)")
    p.add_argument("--sample-ahead", nargs="?", const="on", choices=("auto", "on", "off"),
                   help="draw the next trials' parameters in a child process while the pack "
                   "trains (tpe, gp, cmaes): the sampler's time off the worker's critical path, "
                   "from the study one epoch earlier; auto: on where the worker trains on a GPU "
                   "(default auto; the flag alone: on)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep checkpoints after trials end")
    pbt_flags(p)
    plugins.add_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="one worker of a study that a launcher started on other "
                       "machines (what each of its tasks runs)")
    p.add_argument("--spec", required=True, help="the JSON settings the launcher wrote")
    p.set_defaults(func=cmd_worker)


def pbt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("population-based training", "train the population together "
                             "(one pack); every interval the worst quantile copies the best "
                             "and perturbs its settings (also a study file's pbt: block)")
    g.add_argument("--pbt", action="store_true", help="run the study as population-based training")
    g.add_argument("--pbt-population", type=int, help=f"members (default {Pbt.population})")
    g.add_argument("--pbt-interval", type=int, help=f"epochs between exploit steps (default {Pbt.interval})")
    g.add_argument("--pbt-quantile", type=float, help="fraction replaced, and copied from, at each "
                   f"step (default {Pbt.quantile:g})")
    g.add_argument("--pbt-resample-probability", type=float, help="explore: chance of a fresh "
                   f"value from the space instead of x{FACTORS[0]:g} / x{FACTORS[1]:g} "
                   f"(default {Pbt.resample_probability:g})")
    g.add_argument("--pbt-mutate", help="comma-separated settings that change (default: every "
                   "searched per-trial setting, and a searched batch size or augmentation, "
                   "resampled only)")


def cmd_run(args: argparse.Namespace) -> int:
    quiet_libraries()
    sources = read_sources(args, plugins.blocks())
    # every bad value ends here, before a storage, a study or an MLflow run exists
    check_numbers(args, sources)
    check_trials(args, sources)
    settings = resolve(args, sources, storage_url(args.storage),
                       " ".join(["search", *map(shlex.quote, sys.argv[1:])]))
    launcher = plugins.choose(args, sources.options, sources.where)
    if settings.pbt is not None and args.workers > 1:
        population = settings.pbt["population"]
        if args.workers > population:
            raise UserError(f"--workers {args.workers}: more workers than the {population} PBT "
                            f"members to share (--pbt-population); at most {population}")
        settings.pbt["workers"] = args.workers
    if settings.pbt is not None and (limits := copy_limits(sources.space, sources.overrides)):
        say(limits, "search run")
    # last of the checks: it imports torch and the tracking client (seconds), which a bad
    # value above need not wait for
    preflight(args.mlflow_uri, sources, launcher.trains_here)
    launcher.check(settings)
    return launcher.launch(settings, args.workers)


def preflight(mlflow_uri: str | None, sources, trains_here: bool = True) -> None:
    """A silent tracking server, a missing dataset, a device this machine does not have (when
    its workers train here) or a network that cannot be built is one line before the study
    starts; a network whose rows cannot run batched is said."""
    from search.tracking.client import check_tracking_uri
    from trainer.data import ensure_available
    from trainer.runtime import check_device

    check_tracking_uri(mlflow_uri)
    dataset = trial_setting(sources.space, sources.overrides, "dataset")
    ensure_available(dataset, trial_setting(sources.space, sources.overrides, "data_root"))
    if trains_here:
        check_device(trial_setting(sources.space, sources.overrides, "device"))
    check_networks(sources.space, sources.overrides, dataset)


def check_networks(space, overrides: dict, dataset: str) -> None:
    """Every network the space can name (its `model` choices), with its fixed `model_args` and
    each searched argument at its bounds or choices, built once on the CPU."""
    from trainer.catalogue import dataset_sizes
    from trainer.networks import check

    specs, fixed, extremes = space.networks(overrides)
    variants = [fixed] + [{**fixed, name: v} for name, values in extremes.items() for v in values]
    classes = dataset_sizes(dataset)[2]
    for spec in specs:
        reasons = {check(spec, args, classes) for args in variants} - {None}
        if reasons:
            say(f"model {spec}: its trials train unpacked, one after another in a pack (its "
                f"rows cannot run batched: {sorted(reasons)[0]})", "search run")


def cmd_worker(args: argparse.Namespace) -> int:
    from search.launch.task import run_task

    return run_task(args.spec)
