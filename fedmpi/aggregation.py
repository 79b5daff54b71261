"""Merging learner models (numpy only): FedAvg's weights and FedSparsify majority voting.

Models are flat 1-D parameter vectors; weights come from the learners' training-sample counts.
FedAvg's weighted mean is a plain sum: each learner scales its float32 values by its share n_k / n
(`fedavg_weights`) and the wire's sum adds the products in float32, so the server never holds K models.
Majority voting accumulates in float64 and returns the merged model as float32.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .checks import bool_vector, integer, positive

RULES = ("reference", "kept")


def fedavg_weights(samples: ArrayLike) -> np.ndarray:
    """Each learner's share n_k / n of FedAvg's mean, as the float32 its values are multiplied by.

    Sample counts must be finite and >= 0 with a finite, positive sum (a learner with no samples
    simply contributes nothing; counts whose sum overflows would give every learner a share of 0).
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 or samples.size < 1:
        raise ValueError(f"sample counts must be a non-empty vector, got shape {samples.shape}")
    if not np.all(np.isfinite(samples)) or np.any(samples < 0):
        raise ValueError(f"sample counts must be finite and >= 0, got {samples.tolist()}")
    with np.errstate(over="ignore"):
        total = float(samples.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"sample counts must have a finite, positive sum, got {total}")
    return (samples / total).astype(np.float32)


def majority_quorum(k: int) -> int:
    """Learners that must keep a position for it to survive: ``max(1, k // 2)``.

    The paper keeps a position kept by at least floor(K/2) of the K learners (so for
    K = 2 or 3 one learner suffices, for K = 4 two). The ``max(1, .)`` stops a position
    that nobody kept from surviving when K == 1.
    """
    return max(1, integer("number of learners", k, 1) // 2)


class MajorityVote:
    """Streaming FedSparsify-Local merge with O(N) memory (the server never holds K models).

    Rule "reference" divides a surviving position's weighted sum by the total weight of
    ALL learners, so a learner that pruned the position pulls it towards zero (as the
    authors' code does). Rule "kept" divides by the weight of the learners that kept it.
    A learner's values at positions its mask prunes are treated as zero.
    """

    def __init__(self, n: int, rule: str = "reference") -> None:
        integer("n", n, 0)
        if rule not in RULES:
            raise ValueError(f"unknown majority-vote rule {rule!r}; expected one of {RULES}")
        self.n = int(n)
        self.rule = rule
        self.k = 0
        self._total_weight = 0.0
        self._count = np.zeros(self.n, dtype=np.int32)
        self._sum = np.zeros(self.n, dtype=np.float64)
        self._kept_weight = np.zeros(self.n, dtype=np.float64) if rule == "kept" else None

    def add(self, values: np.ndarray, mask: np.ndarray, weight: float) -> None:
        """Fold in one learner's model, its mask and its weight (> 0: it votes): its sample count, or its share
        n_k / n as the server passes it; only the ratios between learners count."""
        values = np.asarray(values)
        mask = np.asarray(mask)
        if values.shape != (self.n,):
            raise ValueError(f"values must have shape ({self.n},), got {values.shape}")
        if values.dtype.kind not in "iuf":
            raise TypeError(f"values must have a real numeric dtype, got {values.dtype}")
        bool_vector(mask, self.n, ValueError)
        positive("weight", weight, " (a sample count)")
        if self.k == np.iinfo(np.int32).max:
            raise ValueError("too many learners for an int32 vote count")
        w = float(weight)
        self._count += mask
        self._sum += w * np.where(mask, values, 0).astype(np.float64)
        if self._kept_weight is not None:
            self._kept_weight += w * mask
        self._total_weight += w
        self.k += 1

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(merged float32 (N,), surviving mask bool (N,)); non-surviving positions are 0."""
        if self.k == 0:
            raise ValueError("majority vote needs at least one learner; call add() first")
        survive = self._count >= majority_quorum(self.k)
        denom = self._kept_weight[survive] if self._kept_weight is not None else self._total_weight
        merged = np.zeros(self.n, dtype=np.float32)
        merged[survive] = (self._sum[survive] / denom).astype(np.float32)
        return merged, survive
