"""The distributions' table and the learner counts each can use (checked by the trainer's configuration too)."""

import pytest

from preprocess import split
from preprocess.distributions import DISTRIBUTIONS, TEST_FRACTION, SplitError, validate


def test_every_distribution_of_the_table_has_a_builder():
    assert list(split.BUILDERS) == list(DISTRIBUTIONS)
    assert [d for d, rule in DISTRIBUTIONS.items() if rule.paired] == ["uniform-noniid"]
    assert [d for d, rule in DISTRIBUTIONS.items() if rule.skewed] == ["skewed-noniid"]
    assert 0 < TEST_FRACTION < 1


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_any_learner_count_of_at_least_one_suits_the_unpaired(k):
    for name in ("uniform-iid", "skewed-noniid"):
        validate(k, name)


@pytest.mark.parametrize(
    "k, distribution, message",
    [
        (3, "uniform-noniid", r"^uniform-noniid pairs learners with similar age ranges, so --learners must be even"),
        (0, "uniform-iid", r"^--learners must be >= 1, got 0$"),
        (2, "zipf", r"^unknown distribution 'zipf'; choose one of uniform-iid, uniform-noniid, skewed-noniid$"),
    ],
)
def test_impossible_counts_and_unknown_names_are_refused(k, distribution, message):
    with pytest.raises(SplitError, match=message):
        validate(k, distribution)
    validate(2, "uniform-noniid")  # an even count is fine
