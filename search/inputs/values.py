"""The checks a setting gets wherever it comes from (a flag, a study file): one rule, one message."""

from __future__ import annotations

import argparse
from typing import Any


def int_at_least(value: Any, low: int) -> bool:
    """An integer (not a bool) >= low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def pack_value(value: Any) -> int | str:
    """`--pack` / `pack:`: `auto` or an integer >= 1; ValueError says what was expected."""
    if value == "auto" or int_at_least(value, 1):
        return value
    raise ValueError(f"expected auto or an integer >= 1, got {value!r}")


def ramp_value(value: Any) -> int | None:
    """`--ramp` / `ramp:`: `off` (YAML reads a bare off as false; None) or an integer >= 1."""
    if value == "off" or value is False or value is None:  # not `in`: 0 == False
        return None
    if int_at_least(value, 1):
        return value
    raise ValueError(f"expected off or an integer >= 1, got {value!r}")


AUTO_LONGEST = 60.0  # `auto`: a trial checkpoints at least once a minute


def cadence_value(value: Any) -> tuple[str, float]:
    """`--checkpoint-every`: `auto`, N epochs (an integer >= 1) or a time, `30s` / `5m`, as
    ("auto", 60), ("epochs", N) or ("seconds", S); ValueError says what was expected."""
    text = str(value).strip()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if text == "auto":
            return "auto", AUTO_LONGEST
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
            if seconds > 0 and seconds < float("inf"):
                return "seconds", seconds
        elif int(text) >= 1:
            return "epochs", int(text)
    except ValueError:
        pass
    raise ValueError(f"expected auto, a number of epochs >= 1 or a time such as 30s or 5m, got {value!r}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad one is one line, exit 2, by Parser)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value
