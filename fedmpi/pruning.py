"""Masks for global pruning of a flat parameter vector (numpy only).

The model is one flat 1-D vector of all trainable parameters and one bool mask of the
same length (True = kept). Pruning never regrows: a position that is False in the
incoming mask stays False, so sparsity only grows over the rounds (FedSparsify). Two
functions choose over every position instead: ``reconfigure_mask`` (PruneFL's reconfiguration
regrows pruned positions by importance) and ``top_mask`` (GraSP's start mask has no earlier
mask to respect).
"""

from __future__ import annotations

import numpy as np

from .checks import bool_vector, fraction, integer


def n_pruned(n: int, sparsity: float) -> int:
    """Number of positions to zero so that ``n`` parameters reach ``sparsity``.

    It is ``int(round(sparsity * n))``: the nearest integer, with Python's
    round-half-to-even for exact halves (0.5 * 3 -> 2). Rounding (rather than floor)
    keeps the achieved sparsity within 0.5/n of the target.
    """
    n = integer("n", n, 0)
    return round(fraction("sparsity", sparsity) * n)


def magnitude_mask(values: np.ndarray, sparsity: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Global magnitude pruning: keep all but the ``n_pruned(N, sparsity)`` smallest |values|.

    Positions already False in ``mask`` count as pruned first (no regrowth); if they
    already reach the target, ``mask`` is returned unchanged (as a copy). Among equal
    magnitudes the lower index is pruned first, so the result is deterministic and equal
    to a stable argsort of |values|. Also used with non-negative saliency scores (SNIP).
    """
    values = _as_flat_real(values, "values")
    mask = _as_mask(mask, values.size)
    k = n_pruned(values.size, sparsity)
    missing = k - (values.size - int(np.count_nonzero(mask)))
    if missing <= 0:
        return mask
    kept = np.flatnonzero(mask)
    mags = _magnitudes(values[kept])
    if mags.dtype.kind == "f" and np.isnan(mags).any():
        raise ValueError("values contain NaN; magnitude pruning needs comparable magnitudes")
    # O(N) selection instead of a full sort: everything strictly below the k-th
    # smallest magnitude goes, then the lowest indices among the ties at it.
    threshold = np.partition(mags, missing - 1)[missing - 1]
    prune = mags < threshold
    ties = np.flatnonzero(mags == threshold)[: missing - int(np.count_nonzero(prune))]
    prune[ties] = True
    mask[kept[prune]] = False
    return mask


def top_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep the ``N - n_pruned(N, sparsity)`` highest ``scores`` and prune the rest, whatever was kept before.

    GraSP's start mask (scores negated: GraSP removes its highest scores); PruneFL's reconfiguration with
    every kept position movable (``reconfigure_mask`` with ``movable = 1``) gives the same mask. Among equal
    scores the lower index is pruned first, as in ``magnitude_mask``: the result is a stable ascending sort
    of the scores, cut after ``n_pruned`` positions.
    """
    scores = _as_flat_real(scores, "scores")
    if scores.dtype.kind == "f" and np.isnan(scores).any():
        raise ValueError("scores contain NaN; ranking needs comparable scores")
    mask = np.ones(scores.size, dtype=bool)
    mask[np.argsort(scores, kind="stable")[: n_pruned(scores.size, sparsity)]] = False
    return mask


def reconfigure_mask(
    importance: np.ndarray, values: np.ndarray, mask: np.ndarray, sparsity: float, movable: float
) -> np.ndarray:
    """PruneFL's reconfiguration at a fixed size: the new mask keeps ``N - n_pruned(N, sparsity)`` positions.

    The kept positions outside the smallest ``movable`` fraction of them (by |value|) stay, as in the
    reference code, whose reconfiguration may only remove the smallest weights (removing a large weight
    whose gradient happens to be small changes the model, not just how fast it trains); every other slot
    goes to the highest ``importance`` among all remaining positions, pruned ones included, so pruned
    positions may come back. With ``movable = 1`` this is ``top_mask(importance, sparsity)``: the top-k
    importances alone. Ties, in magnitude or importance: the lower index loses first.
    """
    importance = _as_flat_real(importance, "importance")
    values = _as_flat_real(values, "values")
    mask = _as_mask(mask, importance.size)
    if values.size != importance.size:
        raise ValueError(f"values have {values.size} entries, importance {importance.size}")
    if importance.dtype.kind == "f" and np.isnan(importance).any():
        raise ValueError("importance contains NaN; ranking needs comparable scores")
    movable = fraction("movable", movable)
    keep = importance.size - n_pruned(importance.size, sparsity)
    kept = np.flatnonzero(mask)
    stay = min(keep, kept.size - round(movable * kept.size))
    out = np.zeros(importance.size, dtype=bool)
    if stay:
        out[kept[np.argsort(_magnitudes(values[kept]), kind="stable")[kept.size - stay :]]] = True
    rest = np.flatnonzero(~out)
    fill = keep - stay
    if fill:
        out[rest[np.argsort(importance[rest], kind="stable")[rest.size - fill :]]] = True
    return out


def random_mask(mask: np.ndarray, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    """Prune uniformly at random among kept positions until ``n_pruned(N, sparsity)`` are pruned.

    The random-pruning baseline: same schedule and no regrowth as magnitude pruning, but
    the positions are drawn without looking at the weights.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    mask = np.asarray(mask)
    if mask.ndim != 1:
        raise ValueError(f"mask must be 1-D, got shape {mask.shape}")
    mask = _as_mask(mask, mask.size)
    missing = n_pruned(mask.size, sparsity) - (mask.size - int(np.count_nonzero(mask)))
    if missing <= 0:
        return mask
    mask[rng.choice(np.flatnonzero(mask), size=missing, replace=False)] = False
    return mask


def apply_mask(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """New array of the same dtype and shape as ``values`` with zeros where ``mask`` is False."""
    values = np.asarray(values)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} does not match values shape {values.shape}")
    out = values.copy()
    out[~mask] = 0
    return out


def sparsity(values: np.ndarray) -> float:
    """Fraction of entries that are exactly zero (-0.0 counts, NaN does not)."""
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("sparsity of an empty array is undefined")
    return (values.size - np.count_nonzero(values)) / values.size


def _magnitudes(values: np.ndarray) -> np.ndarray:
    """|values|, exact for integers too: as uint64, since np.abs wraps the most negative value of a signed
    type (int8 -128 stays -128) and float64 merges distinct integers above 2**53."""
    if values.dtype.kind == "u":
        return values.astype(np.uint64)
    if values.dtype.kind == "i":
        return np.abs(values.astype(np.int64)).astype(np.uint64)  # |int64 min| wraps to itself: 2**63 as uint64
    return np.asarray(np.abs(values))


def _as_flat_real(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be a flat 1-D vector, got shape {values.shape}")
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{name} must have a real numeric dtype, got {values.dtype}")
    return values


def _as_mask(mask: np.ndarray | None, n: int) -> np.ndarray:
    """A fresh bool mask of length ``n`` (all kept when ``mask`` is None)."""
    return np.ones(n, dtype=bool) if mask is None else bool_vector(mask, n).copy()
