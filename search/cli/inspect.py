"""Reading studies back: `validate` (space files), `status`, `export`, `table`, `report`,
`dashboard` (optuna-dashboard) and `storage-proxy` (Optuna's gRPC proxy for a database)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

from search.cli.args import storage_flag
from search.errors import UserError
from search.inputs.objectives import epochs_run, pareto_numbers, primary, study_objectives
from search.inputs.space import load_space
from search.launch import plugins
from search.logs import quiet_libraries, redact
from search.study.budget import TOTAL_ATTR, finished
from search.study.lineage import GENERATION_ATTR, MEMBER_ATTR, is_pbt
from search.study.measures import MEASURES_ATTR, describe_measures
from search.study.storage import is_file, open_storage, storage_url
from search.tracking import RUN_ATTR
from search.ui.progress import describe_counts, short_params, state_counts, trials_word

State = optuna.trial.TrialState


def add_parsers(sub) -> None:
    p = sub.add_parser("validate", help="check space files; one line per error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("status", help="studies with trial counts per state and the best trial")
    storage_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write a study's trials table")
    p.add_argument("--study", required=True)
    storage_flag(p)
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--output", "-o", help="file to write (default: stdout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("table", help="the study as a markdown table in the notes' format")
    p.add_argument("--study", required=True)
    storage_flag(p)
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("report", help="one self-contained HTML report of the study")
    p.add_argument("--study", required=True)
    storage_flag(p)
    p.add_argument("--output", "-o", help="HTML file (default: reports/STUDY.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("storage-proxy", help="serve Optuna's gRPC storage proxy for a database; "
                       "workers then use --storage grpc://HOST:PORT")
    storage_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=13000)
    p.set_defaults(func=cmd_storage_proxy)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for the storage")
    storage_flag(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)



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


def load_studies(storage_arg: str | None) -> tuple[object, list]:
    storage = open_storage(storage_arg)
    url = storage_url(storage_arg)
    if is_file(url) and not Path(url).exists():
        return storage, []
    return storage, optuna.get_all_study_names(storage)


def cmd_status(args: argparse.Namespace) -> int:
    storage, names = load_studies(args.storage)
    rows = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        row = {"study": name, "counts": state_counts(study), "best": None,
               "objectives": study_objectives(study),
               # a failed checkpoint write: these would restart from an older epoch if killed
               "running_without_crash_safety": [
                   t.number for t in study.get_trials(deepcopy=False, states=(State.RUNNING,))
                   if t.user_attrs.get("crash_safe") is False]}
        if (measured := study.user_attrs.get(MEASURES_ATTR)) is not None:
            row["measures"] = measured
        if (total := study.user_attrs.get(TOTAL_ATTR)) is not None:
            row["n_trials_total"] = total
            row["finished"] = finished(study.get_trials(deepcopy=False))
        trials = study.get_trials(deepcopy=False)
        if is_pbt(trials):
            row["pbt"] = {"members": len({t.user_attrs[MEMBER_ATTR] for t in trials
                                          if MEMBER_ATTR in t.user_attrs}),
                          "generation": max(t.user_attrs.get(GENERATION_ATTR, 0) for t in trials
                                            if MEMBER_ATTR in t.user_attrs),
                          "segments": sum(MEMBER_ATTR in t.user_attrs for t in trials)}
        row.update(plugins.status(study))  # each launcher's fields: a Slurm job's tasks, ...
        if len(study.directions) > 1:
            row["pareto_front"] = sorted(pareto_numbers(study))
        else:
            try:
                b = study.best_trial
                row["best"] = {"number": b.number, "value": b.value, "params": b.params,
                               "mlflow_run_id": b.user_attrs.get(RUN_ATTR)}
            except ValueError:
                pass
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no studies in {redact(storage_url(args.storage))}")
    for r in rows:
        of = f" ({r['finished']} of {r['n_trials_total']} trials)" if "n_trials_total" in r else ""
        line = f"{r['study']}{of}: {describe_counts(r['counts'])}"
        if "measures" in r:
            line += "; " + describe_measures(r["measures"])
        if "pareto_front" in r:
            line += (f"; Pareto front ({', '.join(r['objectives'])}): "
                     f"{trials_word(len(r['pareto_front']))} {r['pareto_front']}")
        if "pbt" in r:
            line += (f"; PBT: {r['pbt']['members']} members, {r['pbt']['segments']} segments, "
                     f"generation {r['pbt']['generation']}")
        for launcher in plugins.launchers():
            if launcher.name in r:
                line += f"; {launcher.status_line(r[launcher.name])}"
        if r["running_without_crash_safety"]:
            unsafe = r["running_without_crash_safety"]
            line += (f"; {len(unsafe)} running without crash safety (checkpoint writes fail): "
                     f"trial {', '.join(map(str, unsafe))}")
        if r["best"]:
            line += (f"; best #{r['best']['number']} {r['best']['value']:.4f} "
                     f"{short_params(r['best']['params'])}")
        print(line)
    return 0


def trials_table(study: optuna.Study) -> list[dict]:
    from search.inputs.constraints import feasible

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
            "mlflow_run_id": t.user_attrs.get(RUN_ATTR),
            "reason": t.user_attrs.get("fail_reason") or t.user_attrs.get("pruned_reason"),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        })
    return rows


def load_existing_study(name: str, storage_arg: str | None) -> optuna.Study:
    """A study that must already exist; a study file's path names its study too."""
    from search.inputs.studyfile import is_study_file, load_study_file

    storage, names = load_studies(storage_arg)
    if name not in names and is_study_file(name):
        name = load_study_file(name, plugins.blocks()).name
    if name not in names:
        raise UserError(f"--study: no study {name!r} in {redact(storage_url(storage_arg))}"
                        f"; studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def cmd_table(args: argparse.Namespace) -> int:
    from search.ui.report import render_table

    print(render_table(load_existing_study(args.study, args.storage)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from search.ui.report import write_report

    quiet_libraries()
    study = load_existing_study(args.study, args.storage)
    path = Path(args.output or f"reports/{study.study_name}.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(write_report(study, path))
    return 0


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
    from search.optuna_seam.dashboard import serve

    storage = open_storage(args.storage)
    print(f"optuna-dashboard for {redact(storage_url(args.storage))} on "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    serve(storage, host=args.host, port=args.port)
    return 0
