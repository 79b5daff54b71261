"""Argument checks shared by the pure modules (pruning, schedule, aggregation, encoding).

A bool is not a number here (True would silently mean 1), and every message names the argument.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def integer(name: str, value: object, minimum: int) -> int:
    """`value` as an int, refusing bools, non-integers and values below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def fraction(name: str, value: object) -> float:
    """`value` as a float in [0, 1] (a sparsity, a fraction of weights)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def positive(name: str, value: object, what: str = "") -> float:
    """`value` as a finite float > 0; `what` says what it stands for in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{what}, got {value!r}")
    return float(value)


def bool_vector(mask: object, n: int | None = None, error: type[Exception] | None = None) -> np.ndarray:
    """`mask` as a 1-D bool array (of length `n` when given), without copying. A wrong dtype raises
    TypeError and a wrong shape ValueError, unless `error` names the one class to raise."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise (error or TypeError)(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim != 1 or (n is not None and mask.shape[0] != n):
        raise (error or ValueError)(f"mask must have shape ({'N' if n is None else n},), got {mask.shape}")
    return mask
