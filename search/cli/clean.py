"""`search clean`: removes what a study leaves on disk beside its results — its checkpoints,
its report and its launcher's files (a Slurm array's) — after listing them with their sizes. Never the storage or the
MLflow runs: those are the results (`optuna delete-study` and `mlflow gc` remove them)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import optuna

from search.cli.args import storage_flag
from search.errors import UserError
from search.launch import plugins
from search.study.checkpoints import DEFAULT_DIR

State = optuna.trial.TrialState


def add_parser(sub) -> None:
    p = sub.add_parser("clean", help="list, then with --yes remove, a study's checkpoints, "
                       "report and its launcher's files (never its storage or MLflow runs)")
    p.add_argument("--study", required=True, help="the study's name (or its study file)")
    p.add_argument("--checkpoint-dir", help=f"where its checkpoints are (default ./{DEFAULT_DIR})")
    p.add_argument("--yes", action="store_true", help="remove them (without it: only list)")
    storage_flag(p)
    p.set_defaults(func=cmd_clean)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def leftovers(name: str, checkpoint_dir: str | None) -> list[Path]:
    """What the study left on disk besides its results, that exists."""
    paths = [Path(checkpoint_dir or DEFAULT_DIR) / name, Path("reports") / f"{name}.html",
             *plugins.files(name)]
    return [p for p in paths if p.exists()]


def in_flight(name: str, storage_arg: str | None) -> int:
    """Trials of the study still running or waiting (their checkpoints are how they resume);
    0 when the storage holds no such study."""
    from search.cli.inspect import load_studies

    storage, names = load_studies(storage_arg)
    if name not in names:
        return 0
    study = optuna.load_study(study_name=name, storage=storage)
    return len(study.get_trials(deepcopy=False, states=(State.RUNNING, State.WAITING)))


def cmd_clean(args: argparse.Namespace) -> int:
    from search.inputs.studyfile import is_study_file, load_study_file

    name = load_study_file(args.study, plugins.blocks()).name if is_study_file(args.study) else args.study
    found = leftovers(name, args.checkpoint_dir)
    if not found:
        print(f"study {name}: nothing to remove (no checkpoints, report or launcher files here)")
        return 0
    total = 0
    for path in found:
        size = size_of(path)
        total += size
        print(f"{human(size):>9}  {path}{'/' if path.is_dir() else ''}")
    if not args.yes:
        print(f"{human(total)} in all; `search clean --study {name} --yes` removes them (the "
              "storage and MLflow runs stay)")
        return 0
    busy = in_flight(name, args.storage)
    if busy:
        raise UserError(f"--study {name}: {busy} trial(s) still running or waiting resume from "
                        "these files; stop or finish the study first")
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"removed {human(total)}")
    return 0
