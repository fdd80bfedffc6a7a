"""Checks of layer sizes, in the style of :mod:`khot._checks` (the error names the argument and value)."""

from __future__ import annotations

import numbers

__all__ = ["check_size"]


def check_size(name: str, value, low: int = 1, high: int | None = None, high_name: str = "") -> int:
    """Check an int in ``[low, high]`` (no upper bound when ``high`` is None); ``high_name`` names ``high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" <= {high_name + ' = ' if high_name else ''}{high}"
        raise ValueError(f"{name}={value} is out of range: expected {low} <= {name}{upper}")
    return int(value)
