"""The report's statistics on hand-computable cases."""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi import stats


def test_constant_values_give_a_degenerate_interval():
    assert stats.bootstrap_mean_interval([0.7] * 25) == (pytest.approx(0.7), pytest.approx(0.7))


def test_two_values_interval_is_the_full_range():
    # A resample of 2 from {0, 1} has mean 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles of 10,000 such means are 0 and 1.
    assert stats.bootstrap_mean_interval([0.0, 1.0]) == (0.0, 1.0)


def test_interval_is_reproducible_and_brackets_the_mean():
    x = np.random.default_rng(3).normal(1.0, 2.0, size=200)
    low, high = stats.bootstrap_mean_interval(x, seed=5)
    assert (low, high) == stats.bootstrap_mean_interval(x, seed=5)
    assert (low, high) != stats.bootstrap_mean_interval(x, seed=6)
    assert low < x.mean() < high
    se = x.std(ddof=1) / np.sqrt(x.size)  # the normal approximation: mean +- 1.96 se
    assert low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)


def test_resamples_not_a_multiple_of_the_chunk():
    low, high = stats.bootstrap_mean_interval(np.arange(10.0), resamples=1_234)
    assert 2.0 < low < 4.5 < high < 7.0


@pytest.mark.parametrize("values,message", [([], "at least one"), ([1.0, np.nan], "finite")])
def test_interval_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        stats.bootstrap_mean_interval(values)


def test_interval_needs_at_least_one_resample():
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        stats.bootstrap_mean_interval([1.0, 2.0], resamples=0)


@pytest.mark.parametrize(
    "low,high,verdict",
    [
        (-0.3, 0.4999, "non-inferior"),
        (-0.3, 0.5, "inconclusive"),  # touching the margin is not below it
        (0.5, 0.9, "inconclusive"),
        (0.5001, 0.9, "inferior"),
        (0.2, 0.8, "inconclusive"),
    ],
)
def test_noninferiority_at_the_margin(low, high, verdict):
    assert stats.noninferiority(low, high, 0.5) == verdict


def test_versus_zero():
    assert stats.versus_zero(-0.2, -0.01) == "better"
    assert stats.versus_zero(0.01, 0.2) == "worse"
    assert stats.versus_zero(-0.1, 0.0) == "no difference"
    with pytest.raises(ValueError, match="low > high"):
        stats.versus_zero(0.2, 0.1)


def test_spearman_hand_cases():
    assert stats.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks of y with a tie: [1, 2.5, 2.5]; x ranks [1, 2, 3]; r = 1.5 / sqrt(2 * 1.5) = sqrt(3)/2.
    assert stats.spearman([1, 2, 3], [0, 5, 5]) == pytest.approx(np.sqrt(3) / 2)
    assert stats.spearman([1, 2], [2, 1]) is None
    assert stats.spearman([1, 2, 3], [7, 7, 7]) is None
    assert stats.average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_bootstrap_draws_exactly_the_resamples_asked_for_in_chunks():
    """1,234 resamples drawn as 1,000 + 234 from default_rng(0): the interval equals numpy's quantiles of
    exactly those means (a chunk of the wrong size changes it)."""
    x = np.arange(10.0)
    rng = np.random.default_rng(0)
    means = np.concatenate([x[rng.integers(0, 10, size=(c, 10))].mean(axis=1) for c in (1000, 234)])
    assert stats.bootstrap_mean_interval(x, resamples=1234) == tuple(np.quantile(means, [0.025, 0.975]))


def test_an_interval_touching_zero_is_no_difference():
    assert stats.versus_zero(0.0, 0.3) == "no difference"
    assert stats.versus_zero(-0.3, 0.0) == "no difference"


def test_noninferiority_refuses_an_inverted_interval():
    with pytest.raises(ValueError, match="low > high"):
        stats.noninferiority(0.6, 0.4, 0.5)


@pytest.mark.parametrize("level", [0.0, 1.0])
def test_the_level_must_be_strictly_between_0_and_1(level):
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_mean_interval([1.0, 2.0], level=level)


def test_a_degenerate_interval_gets_a_verdict():
    """Identical per-subject differences (a method equal to the reference on every subject) bootstrap to
    low == high: a point, not an inverted interval."""
    assert stats.versus_zero(0.0, 0.0) == "no difference"
    assert stats.versus_zero(0.3, 0.3) == "worse"
    assert stats.noninferiority(0.2, 0.2, 0.5) == "non-inferior"
    assert stats.noninferiority(0.7, 0.7, 0.5) == "inferior"


def test_spearman_refuses_unpaired_values():
    """One y value would broadcast against every x (and give None, as if y were constant)."""
    with pytest.raises(ValueError, match="3 x values but 1 y values"):
        stats.spearman([1, 2, 3], [5])


def test_win_matrix_hand_case():
    wins = stats.win_matrix([3.0, 1.0], [1.0, 2.0, 0.0])
    assert wins.tolist() == [[1.0, 1.0, 1.0], [0.5, 0.0, 1.0]]
    assert wins.mean() == pytest.approx(4.5 / 6)  # the AUC: 4 wins and one tie of 6 pairs


def test_bootstrap_win_means_matches_a_loop_over_resampled_subjects():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.5, 1, 7), rng.normal(0, 1, 5)
    got = stats.bootstrap_win_means(stats.win_matrix(pos, neg), resamples=50, seed=9)
    draw = np.random.default_rng(9)  # the same draws, taken as subjects with repetition
    c_pos = draw.multinomial(7, np.full(7, 1 / 7), size=50)
    c_neg = draw.multinomial(5, np.full(5, 1 / 5), size=50)
    for k in range(50):
        p, n = np.repeat(pos, c_pos[k]), np.repeat(neg, c_neg[k])
        assert got[k] == pytest.approx(((p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])).mean())
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        stats.bootstrap_win_means(stats.win_matrix(pos, neg), resamples=0)


def test_paired_auc_difference_hand_cases():
    # the same scores: no difference in any resample
    same = ([3.0, 2.0], [1.0, 2.5])
    assert stats.paired_auc_difference([same], [same]) == (0.0, 0.0, 0.0)
    # AUC 1 against AUC 0.5 on every resample of one member and one non-member each: exactly +0.5
    assert stats.paired_auc_difference([([2.0], [1.0])], [([1.0], [1.0])]) == (0.5, 0.5, 0.5)
    # two seeds: the mean of their differences, (1 - 0.75) and (0.25 - 0.75)
    ours = [([2.0, 3.0], [1.0, 0.0]), ([0.0, 1.0], [2.0, 0.5])]
    theirs = [([2.0, 0.0], [1.0, -1.0]), ([2.0, 0.0], [1.0, -1.0])]
    mean, low, high = stats.paired_auc_difference(ours, theirs, resamples=2000)
    assert mean == pytest.approx(((1 - 0.75) + (0.25 - 0.75)) / 2)
    assert low <= mean <= high


def test_paired_auc_difference_is_narrower_than_the_aucs_own_intervals():
    # a model that scores every subject a little better than the reference: what the subjects share cancels
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1, 120), rng.normal(0, 1, 120)
    ours = (pos + 0.3, neg)
    mean, low, high = stats.paired_auc_difference([ours], [(pos, neg)])
    plain = np.quantile(stats.bootstrap_win_means(stats.win_matrix(pos, neg)), [0.025, 0.975])
    assert mean > 0 and low > 0  # the shift shows
    assert high - low < (plain[1] - plain[0]) / 2


@pytest.mark.parametrize(
    "ours, theirs, message",
    [
        ([], [], "one reference per pair"),
        ([([1.0], [0.0])], [], "one reference per pair"),
        ([([1.0, 2.0], [0.0])], [([1.0], [0.0])], "same non-empty subjects"),
        ([([], [0.0])], [([], [0.0])], "same non-empty subjects"),
        ([([np.nan], [0.0])], [([1.0], [0.0])], "finite"),
        # a second seed's pair on fewer subjects: one resample cannot draw the same subjects for both seeds
        ([([1.0, 2.0], [0.0]), ([1.0], [0.0])], [([1.0, 2.0], [0.0]), ([1.0], [0.0])], "same non-empty subjects"),
    ],
)
def test_paired_auc_difference_refuses_unpaired_scores(ours, theirs, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_auc_difference(ours, theirs)
