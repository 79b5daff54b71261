import numpy as np
import pytest

from fedmpi.pruning import apply_mask, magnitude_mask, n_pruned, random_mask, reconfigure_mask, sparsity, top_mask


def reference_magnitude_mask(values, s, mask=None):
    """Plain full-sort reference: pruned positions first, then stable |v| order."""
    n = values.size
    mask = np.ones(n, bool) if mask is None else mask.copy()
    k = round(s * n)
    if n - mask.sum() >= k:
        return mask
    key = np.where(mask, np.abs(values.astype(np.float64)), -1.0)
    out = np.ones(n, bool)
    out[np.argsort(key, kind="stable")[:k]] = False
    return out


def test_n_pruned_rounds_to_nearest():
    assert n_pruned(10, 0.95) == 10  # 9.5 -> 10 (round half to even)
    assert n_pruned(3, 0.5) == 2  # 1.5 -> 2
    assert n_pruned(5, 0.5) == 2  # 2.5 -> 2
    assert n_pruned(7, 0.3) == 2
    assert n_pruned(0, 0.9) == 0
    assert n_pruned(4, 0.0) == 0 and n_pruned(4, 1.0) == 4


@pytest.mark.parametrize("s", [-0.1, 1.01, float("nan"), True, "0.5"])
def test_n_pruned_rejects_bad_sparsity(s):
    with pytest.raises(ValueError, match="sparsity"):
        n_pruned(10, s)


def test_n_pruned_rejects_bad_n():
    with pytest.raises(ValueError, match="n must"):
        n_pruned(-1, 0.5)


def test_magnitude_hand_case():
    v = np.array([3, -1, 0.5, 2], np.float32)
    assert magnitude_mask(v, 0.5).tolist() == [True, False, False, True]
    assert magnitude_mask(v, 0.25).tolist() == [True, True, False, True]
    assert magnitude_mask(v, 0.75).tolist() == [True, False, False, False]


def test_magnitude_ties_prune_lower_index_first():
    v = np.array([1.0, -1.0, 1.0, 2.0, 1.0])
    assert magnitude_mask(v, 0.4).tolist() == [False, False, True, True, True]
    assert magnitude_mask(v, 0.2).tolist() == [False, True, True, True, True]


def test_magnitude_sparsity_zero_and_one():
    v = np.array([0.0, 1.0, -2.0])
    assert magnitude_mask(v, 0.0).all()
    assert not magnitude_mask(v, 1.0).any()
    assert magnitude_mask(np.zeros(0), 0.5).shape == (0,)


def test_magnitude_no_regrowth():
    v = np.array([10.0, 0.1, 0.2, 5.0, 4.0])
    mask = np.array([False, True, True, True, True])  # the largest weight was pruned before
    out = magnitude_mask(v, 0.4, mask)
    assert out.tolist() == [False, False, True, True, True]
    assert not np.any(out & ~mask)
    assert mask.tolist() == [False, True, True, True, True]  # input untouched


def test_magnitude_returns_mask_when_already_sparser():
    mask = np.array([False, False, False, True])
    out = magnitude_mask(np.array([1.0, 2.0, 3.0, 0.1]), 0.5, mask)
    assert out.tolist() == mask.tolist()
    assert out is not mask


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32])
def test_magnitude_matches_reference_on_random_inputs(dtype):
    rng = np.random.default_rng(0)
    for _trial in range(30):
        n = int(rng.integers(1, 400))
        # few distinct values so that ties are common
        v = rng.integers(-6, 7, n).astype(dtype)
        mask = rng.random(n) > rng.random() * 0.5
        s = float(rng.random())
        out = magnitude_mask(v, s, mask)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, reference_magnitude_mask(v, s, mask))
        assert (~out).sum() == max(n_pruned(n, s), (~mask).sum())


def test_magnitude_int_min_is_large():
    v = np.array([-128, 1, 2, 3], np.int8)  # np.abs(int8(-128)) overflows to -128
    assert magnitude_mask(v, 0.5).tolist() == [True, False, False, True]


def test_integer_magnitudes_are_exact():
    """Integers are ranked by their exact |v|: float64 merges 2**53 + 1 with 2**53 (a tie the lower index loses),
    and np.abs of the most negative value wraps (int8 -128 looked like the smallest magnitude)."""
    assert magnitude_mask(np.array([2**53 + 1, 2**53], np.int64), 0.5).tolist() == [True, False]
    assert magnitude_mask(np.array([2**64 - 1, 2**64 - 2], np.uint64), 0.5).tolist() == [True, False]
    assert magnitude_mask(np.array([np.iinfo(np.int64).min, 5], np.int64), 0.5).tolist() == [True, False]
    # two kept, one movable: the larger |w| (int8 -128) stays, the free slot goes to the highest importance
    out = reconfigure_mask(
        np.array([0, 0, 5.0]), np.array([-128, 1, 0], np.int8), np.array([1, 1, 0], bool), 1 / 3, 0.5
    )
    assert out.tolist() == [True, False, True]


def test_magnitude_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        magnitude_mask(np.array([1.0, np.nan, 2.0]), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        magnitude_mask(np.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match="shape"):
        magnitude_mask(np.ones(3), 0.5, np.ones(4, bool))
    with pytest.raises(ValueError, match="shape"):  # as many rows as values, but not a flat mask
        magnitude_mask(np.ones(3), 0.5, np.ones((3, 1), bool))
    with pytest.raises(TypeError, match="bool"):
        magnitude_mask(np.ones(3), 0.5, np.ones(3))


def test_random_mask_counts_and_subset():
    rng = np.random.default_rng(1)
    n = 1000
    mask = np.ones(n, bool)
    for s in [0.1, 0.5, 0.5, 0.9, 0.99, 1.0]:
        new = random_mask(mask, s, rng)
        assert (~new).sum() == n_pruned(n, s)
        assert not np.any(new & ~mask)  # no regrowth
        mask = new
    assert random_mask(np.zeros(5, bool), 0.3, rng).sum() == 0


def test_random_mask_is_uniform_and_seeded():
    hits = np.zeros(10)
    rng = np.random.default_rng(2)
    for _ in range(2000):
        hits += ~random_mask(np.ones(10, bool), 0.3, rng)
    assert np.all(np.abs(hits / 2000 - 0.3) < 0.05)
    a = random_mask(np.ones(50, bool), 0.5, np.random.default_rng(7))
    b = random_mask(np.ones(50, bool), 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_random_mask_rejects_legacy_rng():
    with pytest.raises(TypeError, match="Generator"):
        random_mask(np.ones(3, bool), 0.5, np.random.RandomState(0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_apply_mask_preserves_dtype_and_input(dtype):
    v = np.arange(1, 6).astype(dtype)
    out = apply_mask(v, np.array([True, False, True, False, True]))
    assert out.dtype == dtype
    assert out.tolist() == [1, 0, 3, 0, 5]
    assert v.tolist() == [1, 2, 3, 4, 5]


def test_apply_mask_rejects_mismatch():
    with pytest.raises(ValueError, match="shape"):
        apply_mask(np.ones(3), np.ones(2, bool))


def test_sparsity():
    assert sparsity(np.array([0.0, -0.0, 1.0, 2.0])) == 0.5
    assert sparsity(np.array([np.nan, 0.0])) == 0.5
    assert sparsity(np.zeros(3)) == 1.0
    with pytest.raises(ValueError, match="empty"):
        sparsity(np.zeros(0))


def test_prune_and_measure_round_trip():
    v = np.random.default_rng(3).standard_normal(10_000).astype(np.float32)
    pruned = apply_mask(v, magnitude_mask(v, 0.95))
    assert sparsity(pruned) == 0.95
    assert np.abs(pruned[pruned != 0]).min() >= np.sort(np.abs(v))[9499]


def reference_top_mask(scores, s):
    """Python's own sort of (score, index) pairs: the n_pruned lowest go, ties lower index first."""
    k = round(s * scores.size)
    out = np.ones(scores.size, bool)
    out[[i for _, i in sorted((float(v), i) for i, v in enumerate(scores))[:k]]] = False
    return out


def test_top_mask_hand_computed():
    scores = np.array([0.5, 3.0, 0.0, 2.0, 0.5, 7.0], np.float32)
    # prune 3 of 6: 0.0 (index 2), then the tied 0.5s (indices 0 and 4)
    np.testing.assert_array_equal(top_mask(scores, 0.5), [False, True, False, True, False, True])
    # prune 2: the tie at 0.5 is broken towards the lower index
    np.testing.assert_array_equal(top_mask(scores, 1 / 3), [False, True, False, True, True, True])
    assert top_mask(scores, 0.0).all() and not top_mask(scores, 1.0).any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9, 0.99])
def test_top_mask_keeps_exactly_the_top_k_like_the_reference(seed, s):
    rng = np.random.default_rng(seed)
    scores = rng.gamma(0.5, size=2003).astype(np.float32)
    scores[rng.integers(0, scores.size, 300)] = 0.0  # many ties, as untouched positions give
    scores[::7] = scores[3]
    mask = top_mask(scores, s)
    np.testing.assert_array_equal(mask, reference_top_mask(scores, s))
    assert scores.size - mask.sum() == n_pruned(scores.size, s)
    assert scores[mask].min() >= scores[~mask].max()


def test_top_mask_ignores_any_earlier_mask_and_negated_scores_prune_the_highest():
    """PruneFL's reconfiguration may bring positions back; GraSP prunes its highest scores via -scores."""
    scores = np.array([5.0, -1.0, 2.0, -3.0], np.float32)
    np.testing.assert_array_equal(top_mask(scores, 0.5), [True, False, True, False])
    np.testing.assert_array_equal(top_mask(-scores, 0.5), [False, True, False, True])


def test_top_mask_rejects_nan_and_non_flat_scores():
    with pytest.raises(ValueError, match="NaN"):
        top_mask(np.array([1.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        top_mask(np.ones((2, 2)), 0.5)


def reference_reconfigure(importance, values, mask, s, movable):
    """The rule written out with Python sorts: the largest (1 - movable) of the kept stay, the rest of the
    budget goes to the highest importances; ties lose at the lower index."""
    n = importance.size
    keep = n - round(s * n)
    kept = [i for i in range(n) if mask[i]]
    stay = min(keep, len(kept) - round(movable * len(kept)))
    by_size = sorted(kept, key=lambda i: (abs(float(values[i])), i), reverse=True)[:stay]
    rest = sorted(set(range(n)) - set(by_size), key=lambda i: (float(importance[i]), i), reverse=True)
    out = np.zeros(n, bool)
    out[by_size + rest[: keep - stay]] = True
    return out


def test_reconfigure_mask_hand_computed():
    importance = np.array([9.0, 0.1, 0.2, 5.0, 0.3, 0.0], np.float32)
    values = np.array([0.0, 4.0, -0.5, 0.0, 0.2, 3.0], np.float32)
    mask = np.array([False, True, True, False, True, True])
    # keep 4; movable 0.5 of the 4 kept: 2 stay by magnitude (4.0 at 1, 3.0 at 5), 2 slots by importance among
    # the rest: 9.0 (pruned, position 0) and 5.0 (pruned, position 3) come back, 0.3 and 0.2 go
    np.testing.assert_array_equal(
        reconfigure_mask(importance, values, mask, 1 / 3, 0.5), [True, True, False, True, False, True]
    )
    # movable 1: importance alone, so the large weights at 1 and 5 (importance 0.1 and 0) go instead
    np.testing.assert_array_equal(
        reconfigure_mask(importance, values, mask, 1 / 3, 1.0), [True, False, True, True, True, False]
    )
    np.testing.assert_array_equal(reconfigure_mask(importance, values, mask, 1 / 3, 1.0), top_mask(importance, 1 / 3))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("movable", [0.1, 0.3, 1.0])
def test_reconfigure_mask_matches_the_reference_and_keeps_the_density(seed, movable):
    rng = np.random.default_rng(seed)
    n, s = 1201, 0.9
    values = rng.standard_normal(n).astype(np.float32)
    mask = magnitude_mask(values, s)
    values = np.where(mask, values, 0).astype(np.float32)
    importance = rng.gamma(0.3, size=n).astype(np.float32)
    importance[rng.integers(0, n, 200)] = 0.0
    new = reconfigure_mask(importance, values, mask, s, movable)
    np.testing.assert_array_equal(new, reference_reconfigure(importance, values, mask, s, movable))
    assert n - new.sum() == n_pruned(n, s)
    assert (new & ~mask).any()  # pruned positions come back
    kept = np.flatnonzero(mask)
    largest = kept[np.argsort(np.abs(values[kept]))[round(movable * kept.size) :]]
    assert new[largest].all()  # the larger weights were never at stake
    if movable == 1.0:
        np.testing.assert_array_equal(new, top_mask(importance, s))


def test_reconfigure_mask_rejects_bad_arguments():
    ones = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        reconfigure_mask(np.array([1, np.nan, 1, 1], np.float32), ones, np.ones(4, bool), 0.5, 0.3)
    with pytest.raises(ValueError, match="movable"):
        reconfigure_mask(ones, ones, np.ones(4, bool), 0.5, 1.5)
    with pytest.raises(ValueError, match="values have 3 entries"):
        reconfigure_mask(ones, ones[:3], np.ones(4, bool), 0.5, 0.3)


def test_reconfigure_keeps_no_more_than_the_target_when_the_mask_is_denser():
    """A mask denser than the target (all 10 kept, s = 0.5): the smallest magnitudes go, exactly 5 stay."""
    values = np.arange(1, 11, dtype=np.float32)
    out = reconfigure_mask(np.zeros(10, np.float32), values, np.ones(10, bool), 0.5, 0.0)
    assert out.tolist() == [False] * 5 + [True] * 5


def test_reconfigure_breaks_importance_ties_by_index():
    """Integer importances tie often: the regrown half is exactly a stable argsort's top half."""
    importance = np.random.default_rng(0).integers(0, 3, 200).astype(np.float32)
    out = reconfigure_mask(importance, np.zeros(200, np.float32), np.zeros(200, bool), 0.5, 1.0)
    expected = np.zeros(200, bool)
    expected[np.argsort(importance, kind="stable")[100:]] = True
    assert out.tolist() == expected.tolist()


def test_reconfiguration_rounds_the_movable_count_and_ties_lose_at_the_lower_index():
    """Hand cases for two rules the reference-test inputs never reach (distinct magnitudes, whole counts)."""
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0], np.float32)
    mask = np.array([True, True, True, True, False, False])
    importance = np.array([0, 0, 0, 0, 5, 6], np.float32)
    # 0.375 of 4 kept = 1.5 movable, rounded (half to even) to 2: the two largest stay, the two most important
    # pruned positions come back (truncating to 1 would keep three)
    got = reconfigure_mask(importance, values, mask, 1 / 3, 0.375)
    assert got.tolist() == [False, False, True, True, True, True]
    # equal magnitudes and equal importances: the lower index loses first
    tied = np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.0], np.float32)
    got = reconfigure_mask(np.array([1, 0, 0, 0, 1, 1], np.float32), tied, mask, 1 / 3, 0.25)
    assert got.tolist() == [False, True, True, True, False, True]


def test_random_mask_leaves_its_input_mask_untouched():
    """The caller's mask is the global mask of the round before: random pruning returns a new one."""
    mask = np.array([True, True, False, True, True, True])
    out = random_mask(mask, 0.5, np.random.default_rng(0))
    assert (~out).sum() == 3 and out is not mask
    assert mask.tolist() == [True, True, False, True, True, True]


def test_apply_mask_refuses_a_mask_of_another_dtype():
    """An integer 0/1 mask would index positions (~1 is -2) instead of selecting them."""
    with pytest.raises(TypeError, match="bool"):
        apply_mask(np.arange(3.0), np.array([1, 0, 1]))


@pytest.mark.parametrize("rank", [magnitude_mask, top_mask])
def test_bool_values_are_not_magnitudes(rank):
    with pytest.raises(TypeError, match="real numeric dtype"):
        rank(np.array([True, False, True]), 0.5)


def test_reconfigure_counts_the_movable_fraction_of_the_kept_positions_not_of_the_target():
    """A mask denser than the target (6 kept of 8, the target keeps 4): movable 0.5 of the 6 kept is 3, so the
    3 largest stay and one slot goes by importance (half of the target's 4 would keep only 2)."""
    values = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0], np.float32)
    mask = np.array([True] * 6 + [False] * 2)
    importance = np.array([0, 0, 0, 0, 0, 0, 5, 6], np.float32)
    got = reconfigure_mask(importance, values, mask, 0.5, 0.5)
    assert got.tolist() == [False, False, False, True, True, True, False, True]
