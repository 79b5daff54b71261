"""How a cohort may be split among learners: the distributions' names and the learner counts each can use.
No I/O and nothing heavy, so the trainer's configuration checks them before any data exists (preprocess.split
builds the splits)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmpi.errors import UserError


@dataclass(frozen=True)
class Distribution:
    """What the checks need to know of a distribution: whether its learners pair up, whether their sizes are skewed."""

    name: str
    paired: bool = False  # learners come in pairs that share an age range: their count must be even
    skewed: bool = False  # learners' sizes follow split.skewed_sizes (a few large sites, many small)


# Table order is the order of listings and of the paper's figures; preprocess.split builds each by name.
DISTRIBUTIONS = {
    "uniform-iid": Distribution("uniform-iid"),
    "uniform-noniid": Distribution("uniform-noniid", paired=True),
    "skewed-noniid": Distribution("skewed-noniid", skewed=True),
}
TEST_FRACTION = 0.2  # the share of each age bin held out as test.h5 unless a split says otherwise


class SplitError(UserError, ValueError):
    """The requested split is impossible for these subjects or parameters."""


def validate(k: int, distribution: str) -> None:
    """SplitError for an unknown distribution or a learner count it cannot use."""
    if distribution not in DISTRIBUTIONS:
        raise SplitError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if k < 1:
        raise SplitError(f"--learners must be >= 1, got {k}")
    if DISTRIBUTIONS[distribution].paired and k % 2:
        raise SplitError(f"{distribution} pairs learners with similar age ranges, so --learners must be even (got {k})")
