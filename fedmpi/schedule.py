"""Sparsity schedules: the target sparsity of federation round ``t`` (rounds count from 1).

Each schedule is a frozen dataclass called as ``s(t) -> float``. ``t = 0`` is accepted
and means the initial model, so round 1 can be compared with it (``s(1) != s(0)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import fraction, integer, positive


class _Schedule:
    """Shared call protocol: validate the round, then evaluate ``_value``."""

    def __call__(self, t: int) -> float:
        return float(self._value(_check_round(t)))

    def _value(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class CubicSchedule(_Schedule):
    """Zhu & Gupta (2017) progressive schedule, as used by FedSparsify.

    Pruning happens in rounds that are multiples of ``frequency`` (the authors' reference code
    rounds t down: ``t' = frequency * floor(t / frequency)``). For ``start <= t' < end``:
    ``s = final + (initial - final) * (1 - (t' - start) / (end - start)) ** exponent``.
    While ``t' < start`` nothing is pruned (0.0, not ``initial``: ``initial`` applies from
    ``start``); from ``end`` on the sparsity is ``final``, also when ``end`` is not a multiple of
    ``frequency`` (there the authors' t' stops short of it). With ``initial = 0`` and
    ``frequency = 1`` the first non-zero sparsity comes at round ``start + 1``; with
    ``frequency = f`` at the first multiple of f after ``start``.
    """

    final: float
    initial: float = 0.0
    start: int = 1
    end: int = 40
    frequency: int = 1
    exponent: float = 3.0

    def __post_init__(self) -> None:
        fraction("final", self.final)
        fraction("initial", self.initial)
        if self.initial > self.final:
            raise ValueError(f"initial ({self.initial}) must not exceed final ({self.final})")
        integer("start", self.start, 1)
        integer("end", self.end, self.start + 1)
        integer("frequency", self.frequency, 1)
        positive("exponent", self.exponent)

    def _value(self, t: int) -> float:
        if t >= self.end:
            return float(self.final)
        t_step = self.frequency * (t // self.frequency)
        if t_step < self.start:
            return 0.0
        progress = (t_step - self.start) / (self.end - self.start)
        return float(self.final + (self.initial - self.final) * (1.0 - progress) ** self.exponent)


@dataclass(frozen=True)
class FractionSchedule(_Schedule):
    """Prune a fraction ``fraction`` of the *remaining* weights in every round that is a multiple
    of ``frequency`` (and not before ``start``), as the authors' code does: the first pruning is
    at round ``frequency`` when ``start = 1``.

    After ``k`` prunings the sparsity is ``1 - (1 - fraction) ** k``, capped at ``final``
    when given (the older FedSparsify schedule, p = 0.02 or 0.04 every 2 or 4 rounds).
    """

    fraction: float
    frequency: int = 1
    start: int = 1
    final: float | None = None

    def __post_init__(self) -> None:
        fraction("fraction", self.fraction)
        if self.fraction == 0:
            raise ValueError("fraction must be > 0 (a schedule that never prunes is ConstantSchedule(0.0))")
        integer("frequency", self.frequency, 1)
        integer("start", self.start, 1)
        if self.final is not None:
            fraction("final", self.final)

    def _value(self, t: int) -> float:
        k = t // self.frequency - (self.start - 1) // self.frequency  # multiples of f in [start, t]
        if k <= 0:
            return 0.0
        s = 1.0 - (1.0 - self.fraction) ** k
        return s if self.final is None else min(s, float(self.final))


@dataclass(frozen=True)
class OneShotSchedule(_Schedule):
    """Prune straight to ``final`` at round ``round`` (0 before it), then keep the mask."""

    final: float
    round: int = 1

    def __post_init__(self) -> None:
        fraction("final", self.final)
        integer("round", self.round, 1)

    def _value(self, t: int) -> float:
        return float(self.final) if t >= self.round else 0.0


@dataclass(frozen=True)
class ConstantSchedule(_Schedule):
    """Always ``value``: 0 for FedAvg; the SNIP/GraSP target, whose mask is fixed at initialization.

    Its value never changes, so it never reports a pruning round.
    """

    value: float = 0.0

    def __post_init__(self) -> None:
        fraction("value", self.value)

    def _value(self, t: int) -> float:
        return float(self.value)


def _check_round(t: int) -> int:
    return integer("round t (rounds count from 1)", t, 0)
