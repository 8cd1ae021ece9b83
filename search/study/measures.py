"""What a study measures beside its space (whose hash the study keeps) and its objectives
(checked on their own): the dataset, epochs, network and its arguments, and constraints every
trial shares. A new study records them (`measures`); a command that would add trials measuring
something else -- the digits demo's study resumed on CIFAR-100 -- is one line, exit 2, and
`search status` shows them. Light: `search status` imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from search.errors import UserError

if TYPE_CHECKING:
    import optuna

    from search.inputs.settings import RunSettings
    from search.inputs.space import Space

MEASURES_ATTR = "measures"  # what a study's values mean beside its space: dataset, epochs, ...
MEASURED = ("dataset", "epochs", "model", "model_args")


def measures(settings: RunSettings, space: Space) -> dict[str, Any]:
    """What defines a study's objective values beside its space (whose hash it keeps) and its
    objectives (checked on their own): the settings every trial shares -- a flag's, else the
    space's, else the trainer's default, or `searched` -- and its constraints."""
    searched = {p.name for p in space.params}
    out: dict[str, Any] = {}
    for key in MEASURED:
        if key in settings.overrides:
            out[key] = settings.overrides[key]
        elif key in searched:
            out[key] = "searched"
        elif key == "model_args":
            out[key] = dict(space.fixed.get(key) or {})
        else:
            out[key] = settings.trial_setting(space, key)
    out["constraints"] = list(settings.constraints)
    return out


def check_measures(study: optuna.Study, settings: RunSettings, space: Space) -> None:
    """Records what a new study measures; refuses a command that would add trials measuring
    something else (another dataset, epochs, network or constraints), in one line."""
    want = measures(settings, space)
    have = study.user_attrs.get(MEASURES_ATTR)
    if have is None:  # a new study (or one from before studies recorded this): from now on
        study.set_user_attr(MEASURES_ATTR, want)
        return
    differ = [k for k in want if k in have and have[k] != want[k]]
    if not differ:
        return
    said = "; ".join(f"{k} {have[k]!r} in the study, {want[k]!r} in this command" for k in differ)
    tail = "-".join(str(want[k]).rsplit(":", 1)[-1] if k != "constraints" else "constrained"
                    for k in differ if k != "model_args") or "args"
    raise UserError(f"study {study.study_name!r} measures something else ({said}): its trials "
                    f"and this command's would mix. Start a separate study with --study "
                    f"{study.study_name}-{tail}, or run the study's own settings")


def describe_measures(measured: dict) -> str:
    """`dataset digits, 3 epochs, network lenet5` (and its arguments and constraints)."""
    words = [f"dataset {measured.get('dataset')}", f"{measured.get('epochs')} epochs",
             f"network {measured.get('model')}"]
    if measured.get("model_args"):
        words[-1] += f" {measured['model_args']}"
    if measured.get("constraints"):
        words.append("constraints " + ", ".join(measured["constraints"]))
    return ", ".join(words)
