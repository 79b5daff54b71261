"""The argument checks the pure modules share: what each accepts, what it refuses, and the message."""

from __future__ import annotations

import fractions
import re

import numpy as np
import pytest

from fedmpi import checks


@pytest.mark.parametrize("value,minimum", [(0, 0), (3, 1), (np.int64(5), 5), (2**70, 0)])
def test_integer_accepts_integers_at_or_above_the_minimum(value, minimum):
    out = checks.integer("n", value, minimum)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, -1, np.float64(2.0)])
def test_integer_refuses_bools_non_integers_and_values_below_the_minimum(value):
    with pytest.raises(ValueError, match="^" + re.escape(f"rounds must be an integer >= 0, got {value!r}") + "$"):
        checks.integer("rounds", value, 0)


@pytest.mark.parametrize("value", [0, 1, 0.5, np.float32(0.25), fractions.Fraction(1, 3)])
def test_fraction_accepts_numbers_in_the_closed_unit_interval(value):
    out = checks.fraction("s", value)
    assert out == pytest.approx(float(value)) and type(out) is float


@pytest.mark.parametrize("value", [True, -0.0001, 1.0001, float("nan"), float("inf"), "0.5", None])
def test_fraction_refuses_what_is_not_a_number_in_0_1(value):
    with pytest.raises(ValueError, match=r"^target must be a number in \[0, 1\], got "):
        checks.fraction("target", value)


def test_positive_names_what_the_value_stands_for():
    assert checks.positive("lr", 0.5) == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"^weight must be a finite number > 0 \(samples\), got "):
            checks.positive("weight", bad, " (samples)")


def test_bool_vector_returns_the_mask_itself_not_a_copy():
    mask = np.array([True, False, True])
    assert checks.bool_vector(mask, 3) is mask
    assert checks.bool_vector([True, False]).tolist() == [True, False]  # a list is made an array


@pytest.mark.parametrize(
    "mask,n,error,message",
    [
        (np.array([1, 0, 1]), 3, TypeError, r"mask must have dtype bool, got int64"),
        (np.ones((2, 2), bool), None, ValueError, r"mask must have shape \(N,\), got \(2, 2\)"),
        (np.ones(4, bool), 3, ValueError, r"mask must have shape \(3,\), got \(4,\)"),
    ],
)
def test_bool_vector_refuses_other_dtypes_and_shapes(mask, n, error, message):
    with pytest.raises(error, match=message):
        checks.bool_vector(mask, n)


def test_bool_vector_raises_the_one_class_it_is_given():
    """The decoder reports a bad wire mask as its own error class (EncodingError), whatever is wrong with it."""

    class Bad(Exception):
        pass

    for mask, n in ((np.zeros(3, np.uint8), 3), (np.zeros(2, bool), 3)):
        with pytest.raises(Bad):
            checks.bool_vector(mask, n, error=Bad)
