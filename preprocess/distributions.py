"""How a cohort may be split among learners: the distributions' names and the learner counts each can use.
No I/O and nothing heavy, so the trainer's configuration checks them before any data exists (preprocess.split
builds the splits)."""

from __future__ import annotations

from fedmpi.errors import UserError

DISTRIBUTIONS = ("uniform-iid", "uniform-noniid", "skewed-noniid")
TEST_FRACTION = 0.2  # the share of each age bin held out as test.h5 unless a split says otherwise


class SplitError(UserError, ValueError):
    """The requested split is impossible for these subjects or parameters."""


def validate(k: int, distribution: str) -> None:
    """SplitError for an unknown distribution or a learner count it cannot use."""
    if distribution not in DISTRIBUTIONS:
        raise SplitError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if k < 1:
        raise SplitError(f"--learners must be >= 1, got {k}")
    if distribution == "uniform-noniid" and k % 2:
        raise SplitError(f"uniform-noniid pairs learners with similar age ranges, so --learners must be even (got {k})")
