"""The report's statistics, pure numpy: a bootstrap interval of a mean, the non-inferiority verdict
against a stated margin, Spearman's rank correlation, and the ROC AUC's bootstrap (of one attack, and
of the paired difference of two attacks on the same subjects). Kept apart from the tables so each is
checked on hand-computable cases."""

from __future__ import annotations

import functools
from collections.abc import Sequence

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


def win_matrix(members: ArrayLike, nonmembers: ArrayLike) -> np.ndarray:
    """W[i, j] = 1 when member i scores above non-member j, 1/2 when tied, else 0: its mean is the ROC AUC."""
    pos = np.asarray(members, dtype=np.float64).reshape(-1)
    neg = np.asarray(nonmembers, dtype=np.float64).reshape(-1)
    wins: np.ndarray = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return wins


@functools.lru_cache(maxsize=4)
def _multiplicities(n_pos: int, n_neg: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """bootstrap_win_means's draws (read-only). They depend on the matrix's shape only, and a report resamples
    dozens of matrices of one shape (every attack, pair and seed on the same subjects): drawing them took 0.19 s
    of each call's 0.22 s."""
    rng = np.random.default_rng(seed)
    c_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=resamples)
    c_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=resamples)
    c_pos.flags.writeable = c_neg.flags.writeable = False
    return c_pos, c_neg


def bootstrap_win_means(wins: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """The mean of a members x non-members matrix over `resamples` bootstrap resamples of its rows and columns.

    Members and non-members are drawn separately, which keeps the class sizes (a pooled resample would change
    them, and could draw no member). Each resample is exact and cheap: with c the multiplicities drawn, its
    mean is c_members @ W @ c_nonmembers / (n_members * n_nonmembers).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    n_pos, n_neg = wins.shape
    c_pos, c_neg = _multiplicities(n_pos, n_neg, resamples, seed)
    means: np.ndarray = ((c_pos @ wins) * c_neg).sum(axis=1) / (n_pos * n_neg)
    return means


def paired_auc_difference(
    ours: Sequence[tuple[ArrayLike, ArrayLike]],
    theirs: Sequence[tuple[ArrayLike, ArrayLike]],
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean over pairs k of AUC(ours[k]) - AUC(theirs[k]), with a percentile bootstrap interval.

    Each pair is two attacks' (member scores, non-member scores) on the same subjects in the same order
    (one seed's model and the reference's model of that seed). A resample draws the subjects once and
    scores every pair on that draw, so what the pairs share, which subjects happen to be easy, cancels:
    the interval is narrower than the two AUCs' own intervals would suggest. The AUC is linear in the win
    matrix, so the resampled difference is one matrix's: the mean of the pairs' win-matrix differences.
    """
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"need one reference per pair, got {len(ours)} pairs and {len(theirs)} references")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diffs: list[np.ndarray] = []
    for (pos, neg), (ref_pos, ref_neg) in zip(ours, theirs):
        if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in (pos, neg, ref_pos, ref_neg)):
            raise ValueError("scores must be finite")  # a NaN would compare as neither above nor tied
        mine, base = win_matrix(pos, neg), win_matrix(ref_pos, ref_neg)
        shape = diffs[0].shape if diffs else mine.shape  # every pair's subjects are the first's
        if mine.shape != base.shape or mine.shape != shape or 0 in mine.shape:
            raise ValueError(
                f"pairs must score the same non-empty subjects, got {mine.shape} and {base.shape} "
                f"(the first pair: {shape})"
            )
        diffs.append(mine - base)
    d = np.mean(diffs, axis=0)
    low, high = np.quantile(bootstrap_win_means(d, resamples, seed), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(d.mean()), float(low), float(high)


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
