"""Brain-age regression metrics (pure numpy): MAE (the paper's headline), RMSE, Pearson r, the MAE of
predicting the mean age, and the brain-age gap's linear age bias."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike


def regression_metrics(pred: ArrayLike, target: ArrayLike) -> dict[str, float]:
    """{"mae", "rmse", "r"} of predictions against true ages.

    r is the Pearson correlation; it is reported as 0.0 when either side is constant
    (e.g. a model that still predicts the mean age everywhere), instead of nan.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} values but target has {target.size}")
    if pred.size == 0:
        raise ValueError("cannot compute regression metrics of zero samples")
    err = pred - target
    dp = pred - pred.mean()
    dt = target - target.mean()
    denom = np.sqrt(np.sum(dp * dp) * np.sum(dt * dt))
    constant = np.ptp(pred) == 0 or np.ptp(target) == 0
    r = 0.0 if constant or not denom > 0 else float(np.clip(np.sum(dp * dt) / denom, -1.0, 1.0))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err * err))),
        "r": r,
    }


def mean_predictor_mae(ages: ArrayLike, train_mean: float) -> float:
    """MAE of predicting the training subjects' mean age for everyone: the bar a model must clear (the
    paper's "predict-the-mean" baseline)."""
    return float(np.mean(np.abs(np.asarray(ages, dtype=np.float64) - train_mean)))


class AgeBias(NamedTuple):
    """The brain-age gap's linear trend with age, gap ~ slope * age + intercept, fitted on held-out subjects.

    Every regression model's gap falls with age (regression to the mean: the young are predicted older, the old
    younger), so an uncorrected gap partly restates the subject's age. Subtracting the trend (Beheshti et al. 2019;
    Smith et al. 2019) leaves a gap uncorrelated with age on the subjects it was fitted on. The correction that
    divides by the slope of predicted on age (Cole et al. 2018) gives this gap divided by 1 + slope, with the same
    correlations with anything else; this one has no division, so it stays finite for a model near the mean
    predictor (1 + slope near 0)."""

    slope: float
    intercept: float
    slope_se: float  # the slope's standard error, to judge a fit from few subjects
    n: int
    ages: tuple[float, float]  # the age range it was fitted on: outside it the correction is extrapolated

    def corrected_gap(self, ages: ArrayLike, pred: ArrayLike) -> np.ndarray:
        """The gap (pred - age) less its trend at each subject's age."""
        a = np.asarray(ages, dtype=np.float64)
        return np.asarray(pred, dtype=np.float64) - a - (self.slope * a + self.intercept)


MIN_BIAS_SUBJECTS = 3  # a line through two subjects fits them exactly: no residual, no standard error


def fit_age_bias(ages: ArrayLike, pred: ArrayLike) -> AgeBias:
    """Ordinary least squares of the gap on age; ValueError with fewer than MIN_BIAS_SUBJECTS subjects or a single
    age, where no trend can be told."""
    a = np.asarray(ages, dtype=np.float64).reshape(-1)
    gap = np.asarray(pred, dtype=np.float64).reshape(-1) - a
    if a.size < MIN_BIAS_SUBJECTS or np.ptp(a) == 0:
        raise ValueError(
            f"an age bias needs at least {MIN_BIAS_SUBJECTS} subjects of more than one age, not {a.size} "
            f"of {len(np.unique(a))}"
        )
    da = a - a.mean()
    sxx = float(np.sum(da * da))
    slope = float(np.sum(da * (gap - gap.mean())) / sxx)
    intercept = float(gap.mean() - slope * a.mean())
    residual = gap - (slope * a + intercept)
    slope_se = float(np.sqrt(np.sum(residual * residual) / (a.size - 2) / sxx))
    return AgeBias(slope, intercept, slope_se, int(a.size), (float(a.min()), float(a.max())))
