"""Brain-age regression metrics (pure numpy): MAE (the paper's headline), RMSE, Pearson r, and the MAE of
predicting the mean age."""

from __future__ import annotations

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
