"""YAML search spaces: schema, validation and sampling.

A space file holds `fixed` settings and searched `params`, both keyed by `trainer.TrainConfig`
field names::

    fixed:
      optimizer: sgdm
      epochs: 150
    params:
      lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
      batch_size: {type: categorical, choices: [32, 64, 128]}
      t_max: {type: categorical, choices: [100, 150, 200], when: {schedule: cosine}}

Types: float and int (low, high, optional log or step), categorical (choices). `when` makes a
parameter exist only while earlier parameters (or fixed settings) take the given value(s).
Every error names the file, the key path and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.errors import UserError
from search.inputs.objectives import DEFAULT as DEFAULT_OBJECTIVES
from search.inputs.objectives import parse_objectives
from trainer.config import MODEL_ARGS_PREFIX, TrainConfig, field_types, fold_model_args
from trainer.errors import ConfigError

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"
TOP_KEYS = {"name", "description", "fixed", "params", "objectives", "constraints"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}
Scalar = (str, int, float, bool, type(None))


class SpaceError(UserError):
    pass


@dataclass
class Param:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)

    def values(self) -> list[Any] | None:
        """All values this parameter can take when finite (categorical or stepped), else None."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            return None
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        vals = [self.low + i * step for i in range(count)]
        return [int(v) for v in vals] if self.type == "int" else vals

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass
class Space:
    path: Path
    name: str
    fixed: dict[str, Any]
    params: list[Param]
    text: str
    description: str = ""
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    constraints: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str:
        """Hash of the parsed content: comments and layout do not change it."""
        content: dict[str, Any] = {"fixed": self.fixed, "params": [vars(p) for p in self.params]}
        if self.objectives != DEFAULT_OBJECTIVES:  # single-objective hashes stay as they were
            content["objectives"] = self.objectives
        canon = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def active(self, param: Param, values: dict[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in param.when.items())

    def sample(self, trial) -> dict[str, Any]:
        """Suggests every active parameter on an Optuna trial; returns fixed + sampled values."""
        values = dict(self.fixed)
        for p in self.params:
            if self.active(p, values):
                values[p.name] = p.suggest(trial)
        return values

    def check_with(self, overrides: dict[str, Any], flags: str) -> None:
        """Re-checks fixed settings and every parameter's values with command-line overrides
        (e.g. `--dataset digits` against batch-size choices), naming the flags on error."""
        fixed = {**self.fixed, **overrides}
        try:
            TrainConfig.from_dict(fixed)
            for p in self.params:
                for key, values in (("choices", p.choices), ("low", [p.low]), ("high", [p.high])):
                    for i, v in enumerate(values):
                        if v is not None:
                            where = f"{self.path}: params.{p.name}.{key}" + (
                                f"[{i}]" if key == "choices" else "")
                            _check_setting(where, p.name, v, fixed)
        except ConfigError as exc:
            raise SpaceError(f"{flags}: {exc}") from None
        except SpaceError as exc:
            raise SpaceError(f"{flags}: {exc}") from None

    def networks(self, overrides: dict[str, Any]) -> tuple[list[str], dict[str, Any],
                                                           dict[str, list[Any]]]:
        """The networks this space can name (its `model` choices, else the one `model`
        setting), their fixed `model_args`, and each searched argument's extremes (its choices,
        or its low and high)."""
        searched = {p.name: p for p in self.params}
        values = {**self.fixed, **overrides}
        model = searched.get("model")
        specs = (model.choices if model is not None and "model" not in overrides
                 else [values.get("model", TrainConfig.model)])
        fixed = fold_model_args(values).get("model_args") or {}
        extremes = {name[len(MODEL_ARGS_PREFIX):]: (p.choices if p.type == "categorical"
                                                    else [p.low, p.high])
                    for name, p in searched.items() if name.startswith(MODEL_ARGS_PREFIX)}
        return specs, dict(fixed), extremes

    def grid(self) -> dict[str, list[Any]]:
        """Search space for Optuna's GridSampler; every parameter must have finite values."""
        out = {}
        for p in self.params:
            vals = p.values()
            if vals is None:
                raise SpaceError(f"{self.path}: params.{p.name}: the grid sampler needs "
                                 "categorical choices or a step; got a continuous range")
            out[p.name] = vals
        return out


def find_file(name_or_path: str | Path, folder: Path, kind: str) -> Path:
    """A path as given, else a bare name looked up in `folder` (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise SpaceError(f"{name_or_path}: is a directory; expected a {kind} YAML file")
    for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise SpaceError(f"{name_or_path}: no such {kind} file (looked here and in {folder})")


def resolve_path(name_or_path: str | Path) -> Path:
    return find_file(name_or_path, SPACES_DIR, "space")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _string_keys(where: str, mapping: dict) -> None:
    """YAML allows `1: x` beside `foo: y`; every key we read names a setting or a field."""
    for key in mapping:
        if not isinstance(key, str):
            raise SpaceError(f"{where}{key!r}: expected a name (a string key), got "
                             f"{type(key).__name__} {key!r}")


def _coerce(v: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; take it as the number the user meant."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def setting_kind(key: str) -> str | None:
    """A setting's annotated type as text; `any` for a network argument (`model_args.NAME`,
    checked against the network's factory at the preflight); None for no setting."""
    if key.startswith(MODEL_ARGS_PREFIX) and key[len(MODEL_ARGS_PREFIX):].isidentifier():
        return "any"
    return field_types().get(key)


def _unknown(where: str) -> SpaceError:
    return SpaceError(f"{where}: unknown setting; expected one of "
                      f"{', '.join(sorted(field_types()))} or model_args.NAME")


def model_path(spec: Any, base: Path) -> Any:
    """A `PATH.py:FUNCTION` model with a relative PATH, made absolute against `base` (the
    folder of the file that names it, or the current directory for a flag)."""
    if not isinstance(spec, str) or spec.startswith("torchvision:"):
        return spec
    location, sep, function = spec.rpartition(":")
    if not sep or not location.endswith(".py") or Path(location).expanduser().is_absolute():
        return spec
    return f"{(base / location).resolve()}:{function}"


def _check_setting(where: str, key: str, value: Any, fixed: dict[str, Any]) -> None:
    """Raises SpaceError unless `key: value` builds a valid TrainConfig beside `fixed`."""
    kind = setting_kind(key) or ""
    if "int" in kind and "float" not in kind and not isinstance(value, int | type(None)):
        raise SpaceError(f"{where}: expected an integer, got {value!r}")
    if "float" in kind and not (_is_number(value) or value is None):
        raise SpaceError(f"{where}: expected a number, got {value!r}")
    if kind.startswith("str") and not isinstance(value, str | type(None)):
        raise SpaceError(f"{where}: expected a string, got {value!r}")
    try:
        TrainConfig.from_dict({**fixed, key: value})
    except ConfigError as exc:
        raise SpaceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
    except TypeError as exc:
        raise SpaceError(f"{where}: {exc}") from None


def _parse_param(file: Path, name: str, entry: Any, fixed: dict[str, Any],
                 known: dict[str, list[Any] | None]) -> Param:
    where = f"{file}: params.{name}"
    if setting_kind(name) is None:
        raise _unknown(where)
    if name in fixed:
        raise SpaceError(f"{where}: also set under fixed; a setting is either fixed or searched")
    if not isinstance(entry, dict):
        raise SpaceError(f"{where}: expected a mapping with a type (float, int, categorical)")
    _string_keys(f"{where}.", entry)
    kind = entry.get("type")
    if kind not in PARAM_KEYS:
        raise SpaceError(f"{where}.type: expected float, int or categorical, got {kind!r}")
    extra = sorted(set(entry) - PARAM_KEYS[kind])
    if extra:
        raise SpaceError(f"{where}.{extra[0]}: not a key of a {kind} parameter; expected "
                         f"{', '.join(sorted(PARAM_KEYS[kind]))}")
    p = Param(name, kind)
    number = "an integer" if kind == "int" else "a number"
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}.choices: expected a non-empty list")
        p.choices = [_coerce(c) for c in choices]
        if name == "model":
            p.choices = [model_path(c, file.parent) for c in p.choices]
        for i, c in enumerate(p.choices):
            if not isinstance(c, Scalar):
                raise SpaceError(f"{where}.choices[{i}]: expected a scalar, got {c!r}")
            _check_setting(f"{where}.choices[{i}]", name, c, fixed)
        if len(set(map(repr, p.choices))) != len(p.choices):
            raise SpaceError(f"{where}.choices: duplicate values")
    else:
        for bound in ("low", "high"):
            if bound not in entry:
                raise SpaceError(f"{where}.{bound}: missing; a {kind} parameter needs low and high")
            value = _coerce(entry[bound])
            ok = isinstance(value, int) if kind == "int" else _is_number(value)
            if not ok or isinstance(value, bool) or not math.isfinite(value):
                noun = "integer" if kind == "int" else "number"
                raise SpaceError(f"{where}.{bound}: expected a finite {noun}, got {entry[bound]!r}")
            setattr(p, bound, value)
        if p.low > p.high:
            raise SpaceError(f"{where}: low {p.low} > high {p.high}; expected low <= high")
        p.log = entry.get("log", False)
        if not isinstance(p.log, bool):
            raise SpaceError(f"{where}.log: expected true or false, got {p.log!r}")
        if "step" in entry:
            p.step = _coerce(entry["step"])
            if not _is_number(p.step) or p.step <= 0 or (kind == "int" and not isinstance(p.step, int)):
                raise SpaceError(f"{where}.step: expected {number} > 0, got {entry['step']!r}")
            if p.log:
                raise SpaceError(f"{where}: step and log cannot be combined (Optuna's rule)")
        if p.log and p.low <= 0:
            raise SpaceError(f"{where}.low: a log range needs low > 0, got {p.low}")
        if kind == "float" and "int" in setting_kind(name) and "float" not in setting_kind(name):
            raise SpaceError(f"{where}.type: {name} is an integer setting; use type int")
        for bound in ("low", "high"):
            _check_setting(f"{where}.{bound}", name, getattr(p, bound), fixed)
    when = entry.get("when", {"": None}) if "when" in entry else {}
    if not isinstance(when, dict) or "" in when:
        raise SpaceError(f"{where}.when: expected a mapping of an earlier setting to its value(s)")
    for key, allowed in when.items():
        if key not in known:
            raise SpaceError(f"{where}.when.{key}: not a fixed setting or an earlier parameter")
        allowed = [_coerce(a) for a in (allowed if isinstance(allowed, list) else [allowed])]
        possible = known[key]
        if possible is not None:
            missing = [a for a in allowed if a not in possible]
            if missing:
                raise SpaceError(f"{where}.when.{key}: {missing[0]!r} is never taken; "
                                 f"{key} takes {possible}")
        p.when[key] = allowed
    return p


def parse_space(text: str, path: Path | str = "<space>") -> Space:
    path = Path(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{path}: {at}malformed YAML ({problem})") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: expected a mapping with fixed and params at the top")
    _string_keys(f"{path}: ", doc)
    extra = sorted(set(doc) - TOP_KEYS)
    if extra:
        raise SpaceError(f"{path}: {extra[0]}: unknown top-level key; expected "
                         f"{', '.join(sorted(TOP_KEYS))}")
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: fixed: expected a mapping of setting: value")
    _string_keys(f"{path}: fixed.", fixed)
    fixed = {k: _coerce(v) for k, v in fixed.items()}
    if "model" in fixed:
        fixed["model"] = model_path(fixed["model"], path.parent)
    for key, value in fixed.items():
        if setting_kind(key) is None:
            raise _unknown(f"{path}: fixed.{key}")
        _check_setting(f"{path}: fixed.{key}", key, value, {})
    try:
        TrainConfig.from_dict(fixed)
    except ConfigError as exc:
        raise SpaceError(f"{path}: fixed.{exc}") from None
    params_doc = doc.get("params")
    if not isinstance(params_doc, dict) or not params_doc:
        raise SpaceError(f"{path}: params: expected a mapping of at least one searched setting")
    _string_keys(f"{path}: params.", params_doc)
    known: dict[str, list[Any] | None] = {k: [v] for k, v in fixed.items()}
    params = []
    for name, entry in params_doc.items():
        p = _parse_param(path, str(name), entry, fixed, known)
        known[p.name] = p.values()
        params.append(p)
    name = doc.get("name") or path.stem
    if not isinstance(name, str):
        raise SpaceError(f"{path}: name: expected a string, got {name!r}")
    objectives = (parse_objectives(doc["objectives"], f"{path}: objectives")
                  if "objectives" in doc else list(DEFAULT_OBJECTIVES))
    from search.inputs.constraints import parse_constraints

    constraints = (parse_constraints(doc["constraints"], f"{path}: constraints")
                   if "constraints" in doc else [])
    return Space(path, name, fixed, params, text, str(doc.get("description", "")), objectives,
                 constraints)


def load_space(name_or_path: str | Path) -> Space:
    path = resolve_path(name_or_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{path}: cannot read ({exc})") from None
    return parse_space(text, path)
