"""Subcommands of the search half: run, validate, status, export, dashboard."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import optuna

from search.algorithms import PRUNERS, SAMPLERS
from search.errors import UserError
from search.logs import quiet_libraries
from search.objectives import epochs_run, pareto_numbers, primary, study_objectives
from search.packing import DEFAULT_RAMP
from search.space import load_space
from search.storage import open_storage, redact, storage_url
from trainer.config import DATASETS, PRECISIONS, ConfigError, TrainConfig, optimiser_steps

State = optuna.trial.TrialState


def pack_size(text: str) -> int | str:
    """argparse type of --pack: `auto` or an integer >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def ramp_size(text: str) -> int | None:
    """argparse type of --ramp: `off` or an integer >= 1."""
    return None if text == "off" else positive_int(text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad one is one line, exit 2, by cli.Parser)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL or journal file "
                   "(default $SEARCH_STORAGE, else search-journal.log)")


def add_parsers(sub) -> None:
    p = sub.add_parser("run", help="create or resume a study and run trials")
    p.add_argument("--space", help="space YAML file, or a name in spaces/")
    p.add_argument("--study", help="a study file (studies/NAME.yaml, or a bare name in "
                   "studies/), or with --space the study's name (default: the space's name)")
    _storage_flag(p)
    p.add_argument("--n-trials", type=int, help="trials in total for this command")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the study file's, else tpe")
    p.add_argument("--pruner", choices=PRUNERS, help="default: the study file's, else median")
    p.add_argument("--objective", help="what the study optimises, comma-separated: val_acc "
                   "(default), seconds, comm_rounds, epochs; several make a Pareto front "
                   "(default: the study file's, else the space's)")
    p.add_argument("--constraint", help="what a trial must reach to count, comma-separated: "
                   "METRIC>=X or METRIC<=X, e.g. \"val_acc>=0.5\" (infeasible trials stay off "
                   "the best trial and the Pareto front; default: the study file's, else the "
                   "space's)")
    p.add_argument("--pruner-startup-trials", type=int,
                   help="median pruner: trials finished before pruning starts (default 5)")
    p.add_argument("--pruner-warmup-epochs", type=int,
                   help="median pruner: epochs of a trial before it can be pruned (default 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="a dead worker is replaced until it dies this many times in a row "
                   "without finishing a trial (default 3)")
    p.add_argument("--pack", type=pack_size, help="trials each worker trains together as one "
                   "stacked model, or auto: as many as its GPU holds (at most 64 and the trials "
                   "left), 1 on a CPU (default: the study file's, else auto)")
    p.add_argument("--ramp", type=ramp_size, help="never more trials in flight than N or the "
                   "trials the study has heard from, whichever is more, so a wide pack is not "
                   f"proposed blind; off: always the whole pack (default {DEFAULT_RAMP})")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--seed", type=int, help="training seed, and the sampler's seed")
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                   "else MLflow's default ./mlflow.db)")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between trial heartbeats on a database storage (default 10)")
    p.add_argument("--storage-patience", type=positive_float, default=600.0,
                   help="seconds a database storage may stay silent (a restart, a failover) "
                   "before the command stops, its trials left to resume (default 600)")
    p.add_argument("--stop-within", type=positive_float, default=20.0,
                   help="seconds a signalled worker may take to stop: it saves a mid-epoch "
                   "checkpoint at the next step unless its epoch ends sooner (default 20)")
    p.add_argument("--max-retry", type=int, default=3,
                   help="times a trial whose worker died or was stopped is re-queued (default 3)")
    p.add_argument("--checkpoint-dir", help="per-epoch trial checkpoints, shared by all workers "
                   "(default ./checkpoints)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep checkpoints after trials end")
    g = p.add_argument_group("Slurm", "submit the --workers as one Slurm job array and return "
                             "(needs a database --storage and an MLflow server every node reaches)")
    g.add_argument("--slurm", action="store_true", help="run the workers as Slurm array tasks")
    g.add_argument("--slurm-partition", help="sbatch --partition")
    g.add_argument("--slurm-time", help="sbatch --time per task, e.g. 04:00:00; SIGTERM comes "
                   "60 s before it and the task requeues itself")
    g.add_argument("--slurm-gpus-per-worker", type=int, default=None,
                   help="GPUs per array task (default 0: CPUs only; 1 on a GPU partition)")
    g.add_argument("--slurm-cpus-per-worker", type=positive_int, help="sbatch --cpus-per-task")
    g.add_argument("--slurm-mem", help="sbatch --mem per task, e.g. 16G")
    g.add_argument("--slurm-account", help="sbatch --account")
    g.add_argument("--slurm-qos", help="sbatch --qos")
    g.add_argument("--slurm-extra", help='more sbatch options, e.g. "--constraint=a100"')
    g.add_argument("--slurm-wait", action="store_true", help="follow the study until the array "
                   "ends (Ctrl-C cancels the array)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", help="one worker of a --slurm study (what its array tasks run)")
    p.add_argument("--spec", required=True, help="the JSON settings `search run --slurm` wrote")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("validate", help="check space files; one line per error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="studies with trial counts per state and the best trial")
    _storage_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write a study's trials table")
    p.add_argument("--study", required=True)
    _storage_flag(p)
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("table", help="the study as a markdown table in the notes' format")
    p.add_argument("--study", required=True)
    _storage_flag(p)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("report", help="one self-contained HTML report of the study")
    p.add_argument("--study", required=True)
    _storage_flag(p)
    p.add_argument("--output", "-o", help="HTML file (default: reports/STUDY.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("retrain", help="retrain the best trial on train+val, test once")
    p.add_argument("--study", required=True, help="the study's name")
    _storage_flag(p)
    p.add_argument("--epochs", type=positive_int, help="override the trial's epochs")
    p.add_argument("--trial", type=int, help="retrain this trial instead of the best one "
                   "(a multi-objective study: one of its Pareto front)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="data to retrain and test on (default: the trial's own dataset)")
    p.add_argument("--data-root", help="folder holding cifar-100-python/ (default: the "
                   "trial's, else $SEARCH_DATA_ROOT)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI for the retrain run (default "
                   "$MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("storage-proxy", help="serve Optuna's gRPC storage proxy for a database; "
                       "workers then use --storage grpc://HOST:PORT")
    _storage_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=13000)
    p.set_defaults(func=cmd_storage_proxy)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for the storage")
    _storage_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)


def cmd_run(args: argparse.Namespace) -> int:
    from search.studyfile import is_study_file, load_study_file

    quiet_libraries()
    if is_study_file(args.study) and not args.space:
        sf = load_study_file(args.study)
        space, name, options, overrides = sf.space, sf.name, sf.options, dict(sf.overrides)
        fixed = [vars(f) for f in sf.fixed_trials]
        table = sf.table
    elif args.space:
        space = load_space(args.space)
        name, options, overrides, fixed, table = args.study or space.name, {}, {}, [], None
    else:
        raise UserError("give --space SPACE.yaml, or --study with a study file (studies/NAME.yaml)")
    overrides.update({k: v for k, v in {
        "epochs": args.epochs, "dataset": args.dataset, "data_root": args.data_root,
        "seed": args.seed, "device": args.device, "precision": args.precision,
    }.items() if v is not None})

    def pick(flag, key, default):
        return flag if flag is not None else options.get(key, default)

    pack = pick(args.pack, "pack", "auto")
    ramp = pick(args.ramp, "ramp", DEFAULT_RAMP)
    ramp = None if ramp == "off" else ramp
    # every bad value ends here, before a storage, a study or an MLflow run exists
    where = f"{sf.path}: " if is_study_file(args.study) and not args.space else ""
    for flag, key, value, low in (
            ("--workers", None, args.workers, 1), ("--heartbeat", None, args.heartbeat, 1),
            ("--max-retry", None, args.max_retry, 0), ("--max-restarts", None, args.max_restarts, 0),
            ("--n-trials", "n_trials", pick(args.n_trials, "n_trials", None), 0),
            ("--pack", "pack", None if pack == "auto" else pack, 1),
            ("--ramp", "ramp", ramp, 1),
            ("--pruner-startup-trials", "pruner_startup_trials",
             pick(args.pruner_startup_trials, "pruner_startup_trials", 0), 0),
            ("--pruner-warmup-epochs", "pruner_warmup_epochs",
             pick(args.pruner_warmup_epochs, "pruner_warmup_epochs", 0), 0)):
        if value is None:
            continue
        source = flag if key is None or key not in options else f"{where}{key}"
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{source}: expected an integer >= {low}, got {value!r}")
    timeout = pick(args.timeout, "timeout", None)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout < float("inf")):
        source = "--timeout" if args.timeout is not None else f"{where}timeout"
        raise UserError(f"{source}: expected a number of seconds > 0, got {timeout!r}")
    if overrides:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()
                         if getattr(args, k, None) is not None) or f"{where}overrides"
        space.check_with(overrides, flags)
    for row in fixed:
        try:
            config = TrainConfig.from_dict({**space.fixed, **overrides, **row["params"]})
        except ConfigError as exc:
            raise UserError(f"{where}fixed_trials {row['label']}: {exc}") from None
        if config.local_steps > optimiser_steps(config):
            raise UserError(f"{where}fixed_trials {row['label']}: local_steps "
                            f"{config.local_steps} exceeds the ~{optimiser_steps(config)} steps "
                            f"it runs ({config.epochs} epochs of {config.dataset}): its workers "
                            "would never average; lower local_steps or raise epochs")

    from search.tracking import check_tracking_uri

    # a silent tracking server or a missing dataset is one line before the study starts
    check_tracking_uri(args.mlflow_uri)
    from trainer.data import ensure_available

    ensure_available(overrides.get("dataset", space.fixed.get("dataset", "cifar100")),
                     overrides.get("data_root", space.fixed.get("data_root")))

    from search.objectives import parse_objectives
    from search.study import RunSpec
    from search.workers import run_study

    objectives = (parse_objectives(args.objective, "--objective") if args.objective
                  else options.get("objectives", space.objectives))
    from search.constraints import parse_constraints

    constraints = (parse_constraints(args.constraint, "--constraint") if args.constraint
                   else options.get("constraints", space.constraints))
    pruner = pick(args.pruner, "pruner", "median")
    if len(objectives) > 1 and pruner != "none":
        print(f"search run: Optuna prunes single-objective studies only; this "
              f"{len(objectives)}-objective study ({', '.join(objectives)}) runs unpruned "
              f"(pruner {pruner} not used)", file=sys.stderr)
        pruner = "none"

    n_trials = pick(args.n_trials, "n_trials", None)
    if n_trials is None and timeout is None:
        n_trials = max(20, len(fixed))
    spec = RunSpec(
        space_text=space.text, space_path=str(space.path), study_name=name,
        storage=storage_url(args.storage), sampler=pick(args.sampler, "sampler", "tpe"),
        pruner=pruner, objectives=objectives, constraints=constraints,
        pruner_startup_trials=pick(args.pruner_startup_trials, "pruner_startup_trials", 5),
        pruner_warmup_epochs=pick(args.pruner_warmup_epochs, "pruner_warmup_epochs", 0),
        n_trials=n_trials, timeout=timeout, overrides=overrides, mlflow_uri=args.mlflow_uri,
        seed=args.seed, fixed_trials=fixed, table=table, heartbeat=args.heartbeat,
        max_retry=args.max_retry, checkpoint_dir=args.checkpoint_dir,
        storage_patience=args.storage_patience, stop_within=args.stop_within,
        keep_checkpoints=args.keep_checkpoints, pack=pack, ramp=ramp,
        command=" ".join(["search", *map(shlex.quote, sys.argv[1:])]),
    )
    if spec.sampler not in SAMPLERS or spec.pruner not in PRUNERS:
        raise UserError(f"sampler {spec.sampler!r} / pruner {spec.pruner!r}: expected one of "
                        f"{', '.join(SAMPLERS)} / {', '.join(PRUNERS)}")
    slurm = slurm_options(args, options.get("slurm"), where)
    if slurm is not None:
        from search.slurm import check_can_submit
        from search.workers import submit_study

        check_can_submit(spec.storage, args.mlflow_uri)
        return submit_study(spec, args.workers, slurm)
    study = run_study(spec, args.workers, args.max_restarts)
    print_summary(study)
    return 0


def slurm_options(args: argparse.Namespace, block: dict | None, where: str):
    """--slurm flags over a study file's `slurm:` block; None when not submitting to Slurm."""
    from search.slurm import SlurmOptions

    block = dict(block or {})
    if not (args.slurm or block.get("enabled", bool(block))):
        return None
    fields = {f.name for f in dataclasses.fields(SlurmOptions)}
    unknown = sorted(set(block) - fields - {"enabled"})
    if unknown:
        raise UserError(f"{where}slurm: unknown key {unknown[0]!r}; expected one of "
                        f"{', '.join(sorted(fields - {'wait', 'stop_grace'}))}")
    opts = SlurmOptions(**{k: v for k, v in block.items() if k != "enabled"})
    for name in ("partition", "time", "gpus_per_worker", "cpus_per_worker", "mem", "account",
                 "qos", "wait"):
        value = getattr(args, f"slurm_{name}", None)
        if value not in (None, False):
            setattr(opts, name, value)
    if args.slurm_extra:
        opts.extra = shlex.split(args.slurm_extra)
    if isinstance(opts.extra, str):
        opts.extra = shlex.split(opts.extra)
    if not isinstance(opts.gpus_per_worker, int) or opts.gpus_per_worker < 0:
        raise UserError(f"--slurm-gpus-per-worker: expected an integer >= 0, got "
                        f"{opts.gpus_per_worker!r}")
    return opts


def cmd_worker(args: argparse.Namespace) -> int:
    from search.workers import run_slurm_task

    return run_slurm_task(args.spec)


def print_summary(study: optuna.Study) -> None:
    line = f"study {study.study_name}: {describe_counts(state_counts(study))}"
    if len(study.directions) > 1:
        front = sorted(pareto_numbers(study))
        line += f"; Pareto front: {len(front)} trials {front}"
    else:
        try:
            best = study.best_trial
            line += f"; best trial {best.number}: {best.value:.4f} {best.params}"
        except ValueError:
            pass
    print(line)


COUNT_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
               "RUNNING": "running", "WAITING": "waiting"}


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state; a failed attempt that was retried (its worker died, or it was stopped)
    counts as RETRIED, not FAIL: its retry stands for it."""
    from search.recovery import retried_numbers

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    out = dict.fromkeys([*COUNT_WORDS, "RETRIED"], 0)
    for t in trials:
        out["RETRIED" if t.number in retried else t.state.name] += 1
    return out


def describe_counts(counts: dict[str, int]) -> str:
    """The same words in `run`, `status` and the progress line."""
    line = ", ".join(f"{counts[k]} {w}" for k, w in COUNT_WORDS.items())
    if counts.get("RETRIED"):
        line += f" ({counts['RETRIED']} attempts retried)"
    return line


def cmd_validate(args: argparse.Namespace) -> int:
    status = 0
    for f in args.files:
        try:
            space = load_space(f)
        except UserError as exc:
            print(f"{exc}", file=sys.stderr)
            status = 2
        else:
            print(f"{space.path}: ok ({len(space.params)} parameters, hash {space.hash})")
    return status


def _load_studies(storage_arg: str | None) -> tuple[object, list]:
    storage = open_storage(storage_arg)
    if "://" not in storage_url(storage_arg) and not Path(storage_url(storage_arg)).exists():
        return storage, []
    return storage, optuna.get_all_study_names(storage)


def cmd_status(args: argparse.Namespace) -> int:
    storage, names = _load_studies(args.storage)
    rows = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        row = {"study": name, "counts": state_counts(study), "best": None,
               "objectives": study_objectives(study),
               # a failed checkpoint write: these would restart from an older epoch if killed
               "running_without_crash_safety": [
                   t.number for t in study.get_trials(deepcopy=False, states=(State.RUNNING,))
                   if t.user_attrs.get("crash_safe") is False]}
        if (job := study.user_attrs.get("slurm_job_id")) is not None:
            from search.slurm import array_tasks

            row["slurm"] = {"job": job, "tasks": array_tasks(job)}
        if len(study.directions) > 1:
            row["pareto_front"] = sorted(pareto_numbers(study))
        else:
            try:
                b = study.best_trial
                row["best"] = {"number": b.number, "value": b.value, "params": b.params,
                               "mlflow_run_id": b.user_attrs.get("mlflow_run_id")}
            except ValueError:
                pass
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no studies in {redact(storage_url(args.storage))}")
    for r in rows:
        line = f"{r['study']}: {describe_counts(r['counts'])}"
        if "pareto_front" in r:
            line += (f"; Pareto front ({', '.join(r['objectives'])}): {len(r['pareto_front'])} "
                     f"trials {r['pareto_front']}")
        if "slurm" in r:
            tasks = r["slurm"]["tasks"]
            line += (f"; Slurm job {r['slurm']['job']}: " + (", ".join(
                f"{n} {state}" for state, n in sorted(tasks.items())) or "no task left"))
        if r["running_without_crash_safety"]:
            unsafe = r["running_without_crash_safety"]
            line += (f"; {len(unsafe)} running without crash safety (checkpoint writes fail): "
                     f"trial {', '.join(map(str, unsafe))}")
        if r["best"]:
            line += f"; best #{r['best']['number']} {r['best']['value']:.4f} {r['best']['params']}"
        print(line)
    return 0


def trials_table(study: optuna.Study) -> list[dict]:
    from search.constraints import feasible

    names, front = study_objectives(study), pareto_numbers(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({
            "number": t.number, "state": t.state.name, "value": primary(t),
            **({f"values_{n}": v for n, v in zip(names, t.values or [], strict=False)}
               if len(names) > 1 else {}),
            "pareto": t.number in front if front else None,
            "feasible": feasible(t) if t.constraints else None,
            "epochs": epochs_run(t),
            **{f"params_{k}": v for k, v in t.params.items()},
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
            "reason": t.user_attrs.get("fail_reason") or t.user_attrs.get("pruned_reason"),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        })
    return rows


def load_existing_study(name: str, storage_arg: str | None) -> optuna.Study:
    """A study that must already exist; a study file's path names its study too."""
    from search.studyfile import is_study_file, load_study_file

    storage, names = _load_studies(storage_arg)
    if name not in names and is_study_file(name):
        name = load_study_file(name).name
    if name not in names:
        raise UserError(f"--study: no study {name!r} in {redact(storage_url(storage_arg))}"
                        f"; studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def cmd_table(args: argparse.Namespace) -> int:
    from search.report import render_table

    print(render_table(load_existing_study(args.study, args.storage)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from search.report import write_report

    quiet_libraries()
    study = load_existing_study(args.study, args.storage)
    path = Path(args.output or f"reports/{study.study_name}.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(write_report(study, path))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from search.tracking import PARENT_ATTR, Tracker, dataset_input
    from trainer import TrainConfig, train

    quiet_libraries()
    study = load_existing_study(args.study, args.storage)
    if args.trial is not None:
        best = next((t for t in study.get_trials(deepcopy=False, states=(State.COMPLETE,))
                     if t.number == args.trial), None)
        if best is None:
            raise UserError(f"--trial {args.trial}: no complete trial {args.trial} in study "
                            f"{study.study_name!r}")
    elif len(study.directions) > 1:
        raise UserError(f"study {study.study_name!r} trades {', '.join(study_objectives(study))}: "
                        f"pick a trial of its Pareto front {sorted(pareto_numbers(study))} "
                        "with --trial N")
    else:
        try:
            best = study.best_trial
        except ValueError:
            raise UserError(f"study {study.study_name!r} has no complete trial to retrain") from None
    values = {**best.user_attrs.get("config", {}), **best.params}
    values.update({k: v for k, v in {"epochs": args.epochs, "dataset": args.dataset,
                                     "data_root": args.data_root}.items() if v is not None})
    config = TrainConfig.from_dict(values)
    recorded = str((study.user_attrs.get("mlflow") or {}).get("uri", ""))
    uri = args.mlflow_uri or (recorded if recorded and "***" not in recorded else None)
    tracker = Tracker(uri, study.study_name)
    # told apart from the trials: its own name and kind, train+val as its data, no val_acc
    # (its held-out split is the test set: that number is test_acc, logged once at the end)
    run_id = tracker.start_trial(study.user_attrs.get(PARENT_ATTR, ""), best.number,
                                 config.to_dict(), {"kind": "retrain",
                                                    "retrain_of_trial": str(best.number)}, "",
                                 run_name=f"retrain · trial-{best.number}", retrain=True)
    final: dict = {}

    def on_epoch(m: dict) -> None:
        tracker.log_epoch(run_id, {k: v for k, v in m.items() if not k.startswith("val_")})

    try:
        result = train(config, on_epoch, holdout="test",
                       on_checkpoint=lambda state: final.update(state=state))
    except BaseException as exc:
        tracker.end_trial(run_id, "FAIL", str(exc) or type(exc).__name__)
        raise
    test_acc = result.val_acc  # with holdout="test" the held-out split is the test set
    model = log_model(tracker, run_id, final["state"], config,
                      name=f"{study.study_name}-trial-{best.number}")
    data = dataset_input(config.to_dict(), retrain=True).dataset
    # on the run and on the logged model (its Metrics), measured after training on train+val
    tracker.client.log_metric(run_id, "test_acc", test_acc, step=result.epochs,
                              model_id=model.model_id, dataset_name=data.name,
                              dataset_digest=data.digest)
    tracker.end_trial(run_id, "COMPLETE")
    tracker.flush()
    study.set_user_attr("retrain", {"trial": best.number, "test_acc": test_acc,
                                    "epochs": result.epochs, "mlflow_run_id": run_id,
                                    "dataset": config.dataset, "model_uri": model.model_uri})
    epochs = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    print(f"study {study.study_name}: trial {best.number} (val {primary(best):.4f}) retrained on "
          f"train+val for {epochs}: test accuracy {test_acc:.4f}; model {model.model_uri}"
          + (f"; run {tracker.run_url(run_id)}" if tracker.run_url() else
             f"; MLflow run {run_id} in {tracker.uri}"))
    return 0


def log_model(tracker, run_id: str, state: dict, config, name: str = "model"):
    """The retrained weights as an MLflow PyTorch model named `name` (uint8 images in, logits
    out) with its signature and an input example; returns MLflow's ModelInfo."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from trainer.data import load_dataset
    from trainer.model import from_checkpoint

    data = load_dataset(config.dataset, config.data_root)
    model = from_checkpoint(state, data.num_classes)
    example = np.ascontiguousarray(data.test.x[:2])
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name=name, signature=infer_signature(example, logits),
            input_example=example, pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info


def cmd_export(args: argparse.Namespace) -> int:
    import csv
    import io

    rows = trials_table(load_existing_study(args.study, args.storage))
    if args.format == "json":
        text = json.dumps(rows, indent=2, default=str) + "\n"
    else:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    storage = open_storage(args.storage)
    print(f"optuna gRPC storage proxy for {redact(storage_url(args.storage))} on "
          f"grpc://{args.host}:{args.port}", file=sys.stderr, flush=True)
    optuna.storages.run_grpc_proxy_server(storage, host=args.host, port=args.port)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    print(f"search dashboard: loading {redact(storage_url(args.storage))} ...", file=sys.stderr,
          flush=True)  # the import and a long journal take a while; say so at once
    from optuna_dashboard import run_server

    storage = open_storage(args.storage)
    print(f"optuna-dashboard for {redact(storage_url(args.storage))} on "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    run_server(storage, host=args.host, port=args.port)
    return 0
