"""Argument checks shared by the public API: clear errors that name the argument."""

from __future__ import annotations

import math
import numbers


def check_int(value, name: str, minimum: int) -> int:
    """An int >= minimum (bools refused): TypeError for the wrong type, ValueError for range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def finite_real(value, name: str) -> float:
    """A finite real number (bools refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def positive_real(value, name: str) -> float:
    """A finite real number > 0, as a float."""
    value = finite_real(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
