"""The report's statistics, pure numpy: a bootstrap interval of a mean, the non-inferiority verdict
against a stated margin, and Spearman's rank correlation. Kept apart from the tables so each is
checked on hand-computable cases."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

BOOTSTRAP_RESAMPLES = 10_000
_CHUNK = 1_000  # resamples drawn at a time: 1,000 x (a thousand subjects) indices stay a few MB


def bootstrap_mean_interval(
    values: ArrayLike, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, fixed seed).

    Used for per-subject paired differences: it assumes nothing about their distribution (absolute
    errors are skewed), and the same values and seed always give the same interval.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("need at least one value")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(_CHUNK, resamples - start), x.size))].mean(axis=1)
            for start in range(0, resamples, _CHUNK)
        ]
    )
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def noninferiority(low: float, high: float, margin: float) -> str:
    """Verdict of a difference "method minus reference" (higher = worse) against a margin fixed in advance.

    "non-inferior" when the whole interval lies below the margin, "inferior" when it lies above it,
    otherwise "inconclusive" (the data cannot tell; more subjects or seeds would).
    """
    if low > high:
        raise ValueError(f"interval ({low}, {high}) has low > high")
    if high < margin:
        return "non-inferior"
    if low > margin:
        return "inferior"
    return "inconclusive"


def versus_zero(low: float, high: float) -> str:
    """Whether an interval of "method minus reference" excludes 0: "better", "worse" or "no difference"."""
    if low > high:
        raise ValueError(f"interval ({low}, {high}) has low > high")
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "no difference"


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks), or None when it is undefined
    or meaningless: fewer than 3 pairs, or a constant variable."""
    a, b = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"{a.size} x values but {b.size} y values")
    if a.size < 3:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return None
    return float((ra * rb).sum() / denominator)
