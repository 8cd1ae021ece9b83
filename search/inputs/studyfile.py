"""Study files (`studies/*.yaml`): a space, a sampler, a pruner, a budget, and fixed trials.

    name: seed-adamw
    space: adamw                 # a space name / path, or an inline {fixed, params} mapping
    sampler: tpe                 # tpe random grid cmaes qmc gp
    pruner: median               # median hyperband sha none
    n_trials: 10                 # this command's budget, fixed trials included
    pack: 4                      # trials trained together per worker (as `--pack`)
    ramp: 10                     # in flight <= max(10, trials heard from) (as `--ramp`; off)
    overrides: {epochs: 150}     # settings forced on every trial
    fixed_trials:                # enqueued once, before the sampler takes over
      - {label: L1, params: {batch_size: 64, lr: 5.0e-4}, reported: 0.4921}
    table: {rows: optimizer, columns: batch_size}   # optional pivot for `search table`
    pbt: {population: 8, interval: 4}               # population-based training (inputs.pbt)

Fixed trials are enqueued by the process that creates the study; a resume enqueues only labels
no trial carries yet, so each runs once however many workers or resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.inputs.objectives import parse_objectives
from search.inputs.space import Space, SpaceError, find_file, load_space, parse_space
from search.inputs.values import pack_value, ramp_value
from trainer.config import field_types

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
KEYS = {"name", "description", "space", "sampler", "pruner", "pruner_startup_trials",
        "pruner_warmup_epochs", "n_trials", "timeout", "pack", "ramp", "overrides", "fixed_trials", "table",
        "objectives", "constraints", "pbt"}  # and each launcher's block (`slurm`, ...)


@dataclass
class FixedTrial:
    label: str
    params: dict[str, Any]
    reported: float | None = None


@dataclass
class StudyFile:
    path: Path
    name: str
    space: Space
    options: dict[str, Any] = field(default_factory=dict)  # sampler, pruner, n_trials, ...
    overrides: dict[str, Any] = field(default_factory=dict)
    fixed_trials: list[FixedTrial] = field(default_factory=list)
    table: dict[str, str] | None = None


def is_study_file(arg: str | None) -> bool:
    if not arg:
        return False
    return arg.endswith((".yaml", ".yml")) or (STUDIES_DIR / f"{arg}.yaml").is_file()


def load_study_file(arg: str, blocks: frozenset[str] | set[str] = frozenset()) -> StudyFile:
    """The study file `arg` names, checked; `blocks`: the launchers' blocks it may hold (each a
    mapping, checked key by key by its launcher with its flags)."""
    path = find_file(arg, STUDIES_DIR, "study")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: expected a mapping with space, sampler, pruner, ...")
    bad_key = next((k for k in doc if not isinstance(k, str)), None)
    if bad_key is not None:
        raise SpaceError(f"{path}: {bad_key!r}: expected a name (a string key)")
    known = KEYS | set(blocks)
    extra = sorted(set(doc) - known)
    if extra:
        raise SpaceError(f"{path}: {extra[0]}: unknown key; expected one of {', '.join(sorted(known))}")
    source = doc.get("space")
    if isinstance(source, dict):
        space = parse_space(yaml.safe_dump(source, sort_keys=False), path)
    elif isinstance(source, str):
        space = load_space(source if Path(source).is_file() or "/" not in source
                           else path.parent / source)
    else:
        raise SpaceError(f"{path}: space: expected a space name or an inline mapping")
    name = doc.get("name") or path.stem
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, dict) or any(k not in field_types() for k in overrides):
        bad = next((k for k in overrides if k not in field_types()), "") if isinstance(overrides, dict) else ""
        raise SpaceError(f"{path}: overrides{'.' + bad if bad else ''}: expected trainer settings")
    known = {p.name: p for p in space.params}
    fixed = []
    for i, row in enumerate(doc.get("fixed_trials") or []):
        where = f"{path}: fixed_trials[{i}]"
        if not isinstance(row, dict) or "label" not in row or not isinstance(row.get("params"), dict):
            raise SpaceError(f"{where}: expected a mapping with label and params")
        for key, value in row["params"].items():
            if key not in known:
                raise SpaceError(f"{where}.params.{key}: not a searched parameter of the space; "
                                 f"expected one of {', '.join(known)}")
            choices = known[key].values()
            if known[key].type == "categorical" and value not in choices:
                raise SpaceError(f"{where}.params.{key}: {value!r} is not among {choices}")
        reported = row.get("reported")
        fixed.append(FixedTrial(str(row["label"]), dict(row["params"]),
                                None if reported is None else float(reported)))
    labels = [f.label for f in fixed]
    if len(set(labels)) != len(labels):
        raise SpaceError(f"{path}: fixed_trials: duplicate labels")
    options = {k: doc[k] for k in ("sampler", "pruner", "pruner_startup_trials",
                                   "pruner_warmup_epochs", "n_trials", "timeout", "pack",
                                   "ramp") if k in doc}
    for block in sorted(set(blocks) & set(doc)):  # checked key by key by its launcher
        if not isinstance(doc[block], dict):
            raise SpaceError(f"{path}: {block}: expected a mapping of the launcher's settings")
        options[block] = doc[block]
    if "pbt" in doc:  # checked with the --pbt flags (inputs.pbt.resolve_pbt)
        from search.inputs.pbt import parse_block

        options["pbt"] = parse_block(doc["pbt"], f"{path}: ")
    if "constraints" in doc:
        from search.inputs.constraints import parse_constraints

        options["constraints"] = parse_constraints(doc["constraints"], f"{path}: constraints")
    if "objectives" in doc:
        options["objectives"] = parse_objectives(doc["objectives"], f"{path}: objectives")
    for key, check in (("pack", pack_value), ("ramp", ramp_value)):
        if key in options:
            try:
                options[key] = check(options[key])
            except ValueError as exc:
                raise SpaceError(f"{path}: {key}: {exc}") from None
    table = doc.get("table")
    if table is not None and not (isinstance(table, dict) and {"rows", "columns"} <= set(table)):
        raise SpaceError(f"{path}: table: expected {{rows: SETTING, columns: SETTING}}")
    return StudyFile(path, str(name), space, options, overrides, fixed, table)
