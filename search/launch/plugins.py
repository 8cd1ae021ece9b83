"""Which launchers exist: the built-in ones and those other packages register under the
entry-point group `search.launchers` (`name = "module:Class"`), each a `base.Launcher`. The
command's flags, `search status`, `search clean` and `search worker` ask them through here."""

from __future__ import annotations

import argparse
import functools
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.launch.base import Launcher
from search.launch.local import LocalLauncher
from search.launch.slurm import SlurmLauncher

GROUP = "search.launchers"


@functools.cache
def launchers() -> tuple[type[Launcher], ...]:
    """Every launcher: the registered ones, then Slurm, then local (chosen when none is)."""
    found = []
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin is one line, not a traceback
            raise UserError(f"launcher {ep.name} ({ep.value}): cannot load it ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Launcher)):
            raise UserError(f"launcher {ep.name} ({ep.value}): expected a search.launch.base.Launcher")
        found.append(cls)
    return (*found, SlurmLauncher, LocalLauncher)


def by_name(name: str) -> type[Launcher]:
    for cls in launchers():
        if cls.name == name:
            return cls
    known = ", ".join(cls.name for cls in launchers())
    raise UserError(f"launcher {name!r}: none such; expected one of {known}")


def add_flags(parser: argparse.ArgumentParser) -> None:
    for cls in launchers():
        cls.add_flags(parser)


def blocks() -> set[str]:
    """The study-file blocks launchers read (`slurm`, ...)."""
    return {cls.block for cls in launchers() if cls.block}


def choose(args: argparse.Namespace, options: dict[str, Any], where: str) -> Launcher:
    """The first launcher whose flags or study-file block ask for it; local otherwise."""
    for cls in launchers():
        chosen = cls.chosen(args, options.get(cls.block) if cls.block else None, where)
        if chosen is not None:
            return chosen
    return LocalLauncher(args.max_restarts)


def status(study: Any) -> dict[str, dict[str, Any]]:
    """Each launcher's fields for a study it launched, by launcher name."""
    return {cls.name: fields for cls in launchers() if (fields := cls.status(study)) is not None}


def status_line(name: str, fields: dict[str, Any]) -> str:
    return by_name(name).status_line(fields)


def files(study_name: str) -> list[Path]:
    return [p for cls in launchers() for p in cls.files(study_name)]
