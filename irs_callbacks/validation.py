"""Argument checks shared by the whole library: one rule per kind of value, one message style.

Every check returns the value in its canonical Python type or raises a ``ValueError`` (``TypeError``
for a value of the wrong kind) whose one line names the argument, the value received and the form
expected. Integers may come as Python ints, numpy integers, integral floats or 0-dim integer
tensors (``monitor.step(global_step)`` with a tensor step is fine); booleans are never numbers here.
Probabilities may be any real number type (numpy ``float32`` included).

Pure Python (``numbers``, ``math``, ``operator``): the statistics import it without torch.
"""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["check_int", "check_probability", "check_fraction", "check_positive", "check_choice", "check_value_range"]


def check_int(value, name: str, minimum: int | None = 0) -> int:
    """``value`` as an int ``>= minimum`` (no lower limit for ``minimum=None``)."""
    expected = "an integer" + ("" if minimum is None else f" >= {minimum}")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        value = int(value)
    else:
        try:
            value = operator.index(value)  # int, numpy integers, 0-dim integer tensors
        except TypeError:
            raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _real(value, name: str, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_probability(value, name: str) -> float:
    """``value`` as a float in the open interval (0, 1)."""
    expected = "a number in the open interval (0, 1)"
    value = _real(value, name, expected)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_fraction(value, name: str) -> float:
    """``value`` as a float in (0, 1] (a share of the training set, a target diversity)."""
    expected = "a number in (0, 1]"
    value = _real(value, name, expected)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_positive(value, name: str) -> float:
    """``value`` as a finite float > 0 (an exponent, a scale)."""
    expected = "a finite number > 0"
    value = _real(value, name, expected)
    if not value > 0.0:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_choice(value, name: str, choices) -> object:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_value_range(value_range, name: str = "value_range") -> tuple[float, float]:
    """``(low, high)`` of float images, finite with ``low < high``, e.g. ``(0, 1)`` or ``(-1, 1)``."""
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) such as (0, 1) or (-1, 1), got {value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be finite with low < high, e.g. (0, 1) or (-1, 1), got {value_range!r}")
    return low, high
