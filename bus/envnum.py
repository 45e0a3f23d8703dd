"""Numbers read from environment variables, one parser for all of them.

Why one: each service reads a few settings from its environment (``SHARDPLANE_TTL``, the
worker's load throttle, ...), and a bad value must be named the same way everywhere: the
variable, the value as given and the unit it should have been in. What a caller does with the
error (refuse to start, or warn and go on without the setting) stays the caller's choice."""

from __future__ import annotations

import os


def positive_float(name: str, unit: str) -> float | None:
    """``$name`` as a number above 0; None when it is unset or blank. Anything else raises
    ValueError naming the variable, the value and ``unit``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of {unit}") from None
    if not value > 0:  # NaN included
        raise ValueError(f"{name}={value:g} must be above 0 {unit}")
    return value
