import numpy as np
import pytest

from fedmpi.metrics import fit_age_bias, mean_predictor_mae, regression_metrics


def test_hand_computed_values():
    m = regression_metrics([1, 2, 3], [1, 2, 5])
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["rmse"] == pytest.approx(np.sqrt(4 / 3))
    # pred deviations (-1, 0, 1), target deviations (-5/3, -2/3, 7/3): r = 4 / sqrt(2 * 26/3)
    assert m["r"] == pytest.approx(4 / np.sqrt(2 * 26 / 3))


def test_matches_numpy_on_random_data():
    rng = np.random.default_rng(0)
    target = rng.uniform(45, 80, 200)
    pred = target + rng.normal(0, 4, 200)
    m = regression_metrics(pred.astype(np.float32), target)
    assert m["mae"] == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-5)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - target) ** 2)), rel=1e-5)
    assert m["r"] == pytest.approx(np.corrcoef(pred, target)[0, 1], rel=1e-5)


def test_constant_prediction_gives_zero_r_not_nan():
    m = regression_metrics(np.full(5, 62.68, dtype=np.float32), [50, 55, 60, 65, 70])
    assert m["r"] == 0.0
    assert m["mae"] == pytest.approx(np.mean(np.abs(62.68 - np.array([50, 55, 60, 65, 70]))), rel=1e-6)
    assert regression_metrics([1.0, 2.0], [3.0, 3.0])["r"] == 0.0


def test_perfect_and_anticorrelated():
    assert regression_metrics([1, 2, 3], [1, 2, 3]) == {"mae": 0.0, "rmse": 0.0, "r": pytest.approx(1.0)}
    assert regression_metrics([3, 2, 1], [1, 2, 3])["r"] == pytest.approx(-1.0)


@pytest.mark.parametrize("pred, target", [([1, 2], [1, 2, 3]), ([], [])])
def test_rejects_bad_lengths(pred, target):
    with pytest.raises(ValueError):
        regression_metrics(pred, target)


def test_r_of_a_perfect_linear_fit_is_exactly_one():
    """Rounding can put the correlation a hair above 1 (1.0000000000000002 here): it is clipped."""
    t = np.array([65.43, 60.2, 66.03])
    assert regression_metrics(2 * t + 1, t)["r"] == 1.0


def test_errors_are_computed_in_float64():
    assert regression_metrics([60.123456789], [60.0])["mae"] == pytest.approx(0.123456789, abs=1e-12)


def test_the_mean_predictor_s_mae_uses_the_training_mean_not_the_test_mean():
    assert mean_predictor_mae([50.0, 60.0, 70.0], 55.0) == pytest.approx((5 + 5 + 15) / 3)
    assert mean_predictor_mae(np.array([40.0, 80.0]), 60.0) == 20.0


def test_age_bias_of_a_hand_computed_case():
    """Ages 50, 60, 70 predicted 56, 60, 64: gaps 6, 0, -6, slope -120/200 = -0.6, intercept 0 + 0.6 * 60 = 36;
    the trend explains every gap, so the corrected gaps are 0 and the slope's standard error is 0."""
    bias = fit_age_bias([50, 60, 70], [56, 60, 64])
    assert bias.slope == pytest.approx(-0.6) and bias.intercept == pytest.approx(36.0)
    assert bias.slope_se == pytest.approx(0.0, abs=1e-12) and bias.n == 3 and bias.ages == (50.0, 70.0)
    np.testing.assert_allclose(bias.corrected_gap([50, 60, 70], [56, 60, 64]), 0.0, atol=1e-12)
    assert bias.corrected_gap([80], [70])[0] == pytest.approx(-10 - (-0.6 * 80 + 36))  # -10 - (-12) = 2


def test_age_bias_matches_numpys_least_squares_and_leaves_a_gap_uncorrelated_with_age():
    rng = np.random.default_rng(3)
    ages = rng.uniform(45, 80, 200)
    pred = 0.6 * ages + 25 + rng.normal(0, 4, 200)  # regression to the mean: the old predicted younger
    bias = fit_age_bias(ages, pred)
    (slope, intercept), cov = np.polyfit(ages, pred - ages, 1, cov=True)
    assert bias.slope == pytest.approx(slope) and bias.intercept == pytest.approx(intercept)
    assert bias.slope_se == pytest.approx(np.sqrt(cov[0, 0]))
    corrected = bias.corrected_gap(ages, pred)
    assert regression_metrics(pred - ages, ages)["r"] < -0.5
    assert abs(np.corrcoef(corrected, ages)[0, 1]) < 1e-9 and abs(corrected.mean()) < 1e-9


def test_the_correction_is_coles_gap_scaled_by_its_slope():
    """Cole et al.'s corrected gap, (pred - b) / a - age with pred ~ a * age + b, is this one over 1 + slope."""
    rng = np.random.default_rng(4)
    ages = rng.uniform(45, 80, 50)
    pred = 0.7 * ages + 20 + rng.normal(0, 3, 50)
    bias = fit_age_bias(ages, pred)
    a, b = np.polyfit(ages, pred, 1)
    np.testing.assert_allclose(bias.corrected_gap(ages, pred) / (1 + bias.slope), (pred - b) / a - ages, atol=1e-9)


@pytest.mark.parametrize("ages", [[60.0, 70.0], [65.0, 65.0, 65.0], []])
def test_no_age_bias_from_too_few_subjects_or_one_age(ages):
    with pytest.raises(ValueError, match="at least 3 subjects of more than one age"):
        fit_age_bias(ages, np.asarray(ages) + 1)
