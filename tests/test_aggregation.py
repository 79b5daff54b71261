import numpy as np
import pytest

from fedmpi.aggregation import MajorityVote, fedavg_weights, majority_quorum


def majority_vote(values, masks, weights, rule="reference"):
    """The server's merge over K stacked models (K, N): MajorityVote fed one learner at a time."""
    vote = MajorityVote(values.shape[1], rule)
    for row, mask, w in zip(values, masks, weights):
        vote.add(row, mask, float(w))
    return vote.result()


def naive_majority_vote(values, masks, weights, rule):
    """Per-position Python loop, written straight from the method description."""
    k, n = values.shape
    quorum = max(1, k // 2)
    merged, survive = np.zeros(n, np.float32), np.zeros(n, bool)
    for j in range(n):
        keepers = [i for i in range(k) if masks[i, j]]
        if len(keepers) < quorum:
            continue
        survive[j] = True
        total = 0.0
        for i in keepers:
            total += float(weights[i]) * float(values[i, j])
        denom = sum(float(weights[i]) for i in (keepers if rule == "kept" else range(k)))
        merged[j] = np.float32(total / denom)
    return merged, survive


def random_case(rng, k, n):
    values = rng.standard_normal((k, n)).astype(np.float32)
    masks = rng.random((k, n)) < rng.uniform(0.05, 0.95, size=(k, 1))
    values[~masks] = 0.0  # learners send pruned models
    weights = rng.integers(1, 3000, k).astype(float)
    return values, masks, weights


def fedavg(values, samples):
    """What a FedAvg round computes: each learner's float32 values times its share, summed in float32."""
    shares = fedavg_weights(samples)
    return np.sum([row * w for row, w in zip(values.astype(np.float32), shares)], axis=0, dtype=np.float32)


def test_fedavg_sum_of_shares_matches_the_weighted_mean():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((5, 1000)).astype(np.float32)
    samples = [2401, 1765, 0, 964, 714]
    assert fedavg_weights(samples).dtype == np.float32
    expected = np.average(values.astype(np.float64), axis=0, weights=samples)
    np.testing.assert_allclose(fedavg(values, samples), expected, rtol=1e-5, atol=1e-6)


def test_fedavg_hand_case():
    assert fedavg_weights([1, 3]).tolist() == [0.25, 0.75]
    assert fedavg(np.array([[1.0, 2.0], [3.0, 6.0]]), [1, 3]).tolist() == [2.5, 5.0]


@pytest.mark.parametrize(
    "weights, msg",
    [
        ([1, -1], ">= 0"),
        ([1, np.nan], "finite"),
        ([0, 0], "positive sum"),
        ([1e308, 1e308, 6], "finite, positive sum, got inf"),  # each finite: the shares were all 0
        ([], "non-empty"),
        ([[1, 2], [3, 4]], "vector"),
    ],
)
def test_fedavg_weights_validates_sample_counts(weights, msg):
    with pytest.raises(ValueError, match=msg):
        fedavg_weights(weights)


def test_majority_quorum():
    assert [majority_quorum(k) for k in range(1, 10)] == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError):
        majority_quorum(0)


def test_majority_vote_hand_case_k4():
    values = np.array(
        [[1.0, 2.0, 0.0, 4.0], [3.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32
    )
    masks = values != 0
    weights = [1, 1, 2, 4]  # total 8; quorum 2
    merged, mask = majority_vote(values, masks, weights, rule="reference")
    assert mask.tolist() == [True, True, False, False]
    assert merged.tolist() == [(1 + 3 + 10) / 8, (2 + 12) / 8, 0.0, 0.0]
    merged, mask = majority_vote(values, masks, weights, rule="kept")
    assert mask.tolist() == [True, True, False, False]
    assert merged.tolist() == [3.5, np.float32(14 / 3), 0.0, 0.0]


def test_majority_vote_single_learner_keeps_its_mask():
    v = np.array([[0.5, 0.0, -2.0]], np.float32)
    merged, mask = majority_vote(v, v != 0, [10])
    assert mask.tolist() == [True, False, True]
    assert merged.tolist() == [0.5, 0.0, -2.0]


@pytest.mark.parametrize("rule", ["reference", "kept"])
@pytest.mark.parametrize("k", range(1, 10))
def test_majority_vote_matches_naive_loop(rule, k):
    rng = np.random.default_rng(k)
    values, masks, weights = random_case(rng, k, 300)
    merged, mask = majority_vote(values, masks, weights, rule=rule)
    ref_merged, ref_mask = naive_majority_vote(values, masks, weights, rule)
    assert merged.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(merged, ref_merged)  # same float64 operations, same order


def test_reference_rule_with_full_masks_is_fedavg():
    rng = np.random.default_rng(5)
    values = rng.standard_normal((6, 500)).astype(np.float32)
    weights = [2401, 1765, 1303, 964, 714, 528]
    merged, mask = majority_vote(values, np.ones_like(values, bool), weights)
    assert mask.all()
    np.testing.assert_array_equal(
        merged, np.average(values.astype(np.float64), axis=0, weights=weights).astype(np.float32)
    )
    np.testing.assert_allclose(merged, fedavg(values, weights), rtol=1e-5, atol=1e-6)


def test_values_outside_the_mask_are_ignored():
    values = np.array([[1.0, 9.0], [3.0, 9.0]], np.float32)
    masks = np.array([[True, False], [True, False]])
    merged, mask = majority_vote(values, masks, [1, 1])
    assert merged.tolist() == [2.0, 0.0] and mask.tolist() == [True, False]


@pytest.mark.parametrize("rule", ["reference", "kept"])
def test_streaming_vote_counts_learners_and_can_be_read_mid_way(rule):
    """The server adds learners one at a time (majority_vote is that loop; the naive loop above checks the
    math): result() must not consume the running sums."""
    rng = np.random.default_rng(11)
    values, masks, weights = random_case(rng, 7, 2000)
    vote = MajorityVote(2000, rule=rule)
    for v, m, w in zip(values[:6], masks[:6], weights[:6]):
        vote.add(v, m, w)
    first, _ = vote.result()
    np.testing.assert_array_equal(vote.result()[0], first)
    vote.add(values[6], masks[6], weights[6])
    assert vote.k == 7
    merged, mask = vote.result()
    expected_merged, expected_mask = naive_majority_vote(values, masks, weights, rule)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(merged, expected_merged, rtol=1e-5, atol=1e-6)


def test_majority_vote_errors():
    with pytest.raises(ValueError, match="rule"):
        MajorityVote(3, rule="median")
    vote = MajorityVote(3)
    with pytest.raises(ValueError, match="add"):
        vote.result()
    with pytest.raises(ValueError, match="shape"):
        vote.add(np.ones(4), np.ones(4, bool), 1)
    with pytest.raises(ValueError, match="bool"):
        vote.add(np.ones(3), np.ones(3), 1)
    with pytest.raises(ValueError, match="weight"):
        vote.add(np.ones(3), np.ones(3, bool), 0)
    with pytest.raises(ValueError, match="weight"):
        vote.add(np.ones(3), np.ones(3, bool), float("inf"))
    assert vote.k == 0  # rejected adds left no trace


def test_a_learners_value_outside_its_own_mask_is_ignored_where_the_position_survives():
    """Position 1 is kept by learner 2 only (quorum 1 of 2): learner 1's 9 there is not its value."""
    values = np.array([[1, 9], [3, 5]], np.float32)
    masks = np.array([[True, False], [True, True]])
    merged, mask = majority_vote(values, masks, [1, 1])
    assert merged.tolist() == [2.0, 2.5] and mask.tolist() == [True, True]


def test_the_vote_counts_more_learners_than_a_small_integer_holds():
    merged, mask = majority_vote(np.ones((200, 1), np.float32), np.ones((200, 1), bool), np.ones(200))
    assert mask.tolist() == [True] and merged.tolist() == [1.0]


def test_a_vote_refuses_values_that_are_not_real_numbers():
    """bool values would count as 0/1 and complex ones lose their imaginary part in the float64 sum."""
    vote = MajorityVote(3)
    for values in (np.ones(3, bool), np.ones(3, np.complex64)):
        with pytest.raises(TypeError, match="real numeric dtype"):
            vote.add(values, np.ones(3, bool), 1)
    assert vote.k == 0
