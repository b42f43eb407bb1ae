"""Argument checks shared by the optimisers, the posterior and the trainers."""
from __future__ import annotations

import math

from .backend import array_module


def positive(value, name):
    """A finite float > 0, or TypeError / ValueError naming the argument."""
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a number > 0, got {value!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def positive_int(value, name):
    """An integer >= 1 (bools refused), or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def all_finite(a) -> bool:
    """Every entry of a is finite: a finite sum proves it (nan and inf propagate through a sum) in one pass with no
    temporary; only a non-finite sum (or an overflow of finite entries) pays for the element-wise test."""
    xp = array_module(a)
    return bool(xp.isfinite(a.sum())) or bool(xp.isfinite(a).all())
