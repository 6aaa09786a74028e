"""Argument checks for numbers, shared by the planning and Lightning layers (no Lightning).

Python counts ``True`` as the int 1; no count, seed or weight here means that, so every check
refuses bools. Each raising check names the argument (``what``: ``"ImportanceSettings.steps"``,
``"recalibrate_batchnorm(batches=...)"``), what it must be and the value it got.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_count", "check_finite", "check_int", "is_int", "is_real"]


def is_int(value: Any, *, numpy: bool = False) -> bool:
    """``value`` is an int and not a bool (with ``numpy``, a NumPy integer counts too)."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer) if numpy else int)


def is_real(value: Any) -> bool:
    """``value`` is a finite int or float and not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_count(what: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum`` (or ``None`` when ``optional``).

    The message: ``"{what} must be [None or ]an int >= {minimum}, got {value!r}"``.
    """
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        raise ValueError(f"{what} must be {'None or ' if optional else ''}an int >= {minimum}, got {value!r}")


def check_int(what: str, value: Any, minimum: int) -> None:
    """Raise ``TypeError`` unless ``value`` is an int (NumPy integers included), ``ValueError``
    unless it is >= ``minimum``; the messages name ``what`` and the type or value it got."""
    if not is_int(value, numpy=True):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


def check_finite(what: str, value: Any, *, positive: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (``positive``) or >= 0.

    The message: ``"{what} must be a finite number > 0|>= 0, got {value!r}"``.
    """
    if not is_real(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
