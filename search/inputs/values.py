"""The checks a setting gets wherever it comes from (a flag, a study file): one rule, one message."""

from __future__ import annotations

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
