import itertools

import pytest

from fedmpi.schedule import ConstantSchedule, CubicSchedule, FractionSchedule, OneShotSchedule


def test_cubic_hand_values():
    s = CubicSchedule(final=0.95, start=1, end=11)
    assert s(1) == 0.0  # (1 - 0)^3 = 1 -> initial
    assert s(6) == pytest.approx(0.95 * (1 - 0.5**3))  # 0.83125
    assert s(2) == pytest.approx(0.95 * (1 - 0.9**3))  # 0.257545
    assert s(10) == pytest.approx(0.95 * (1 - 0.1**3))  # 0.94905
    assert s(11) == 0.95 and s(20) == 0.95
    assert s(0) == 0.0


def test_cubic_before_start_and_initial():
    s = CubicSchedule(final=0.9, initial=0.5, start=3, end=7)
    assert s(1) == 0.0 and s(2) == 0.0
    assert s(3) == 0.5  # initial applies from start
    assert s(5) == pytest.approx(0.9 - 0.4 * 0.5**3)
    assert s(7) == 0.9


def test_cubic_frequency_prunes_at_multiples_of_f():
    """The authors' code rounds t down to a multiple of f: pruning in rounds f, 2f, 3f, ..."""
    s = CubicSchedule(final=0.95, start=1, end=11, frequency=2)
    expected = [0.0] + [0.95 * (1 - (1 - (2 * k - 1) / 10) ** 3) for k in (1, 1, 2, 2, 3, 3, 4, 4, 5)] + [0.95]
    assert [s(t) for t in range(1, 12)] == pytest.approx(expected)
    assert s(2) == pytest.approx(0.95 * (1 - 0.9**3)) and s(3) == s(2)
    assert s(10) == pytest.approx(0.95 * (1 - 0.1**3))
    assert [t for t in range(1, 15) if s(t) != s(t - 1)] == [2, 4, 6, 8, 10, 11]


def test_cubic_frequency_with_later_start():
    s = CubicSchedule(final=0.9, start=3, end=13, frequency=5)
    assert [s(t) for t in range(1, 5)] == [0.0] * 4  # 5 is the first multiple of f at or after start
    assert s(5) == s(9) == pytest.approx(0.9 * (1 - 0.8**3))
    assert s(10) == pytest.approx(0.9 * (1 - 0.3**3))
    assert [t for t in range(1, 20) if s(t) != s(t - 1)] == [5, 10, 13]


def test_cubic_exponent():
    s = CubicSchedule(final=0.8, start=1, end=5, exponent=1.0)
    assert [s(t) for t in range(1, 6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(final=0.95, end=40),
        dict(final=0.99, start=5, end=33, frequency=3),
        dict(final=0.85, initial=0.2, start=2, end=9, exponent=0.5),
        dict(final=1.0, end=2),
    ],
)
def test_cubic_monotone_and_bounded(kwargs):
    s = CubicSchedule(**kwargs)
    values = [s(t) for t in range(0, 60)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert all(0.0 <= v <= kwargs["final"] for v in values)
    assert values[-1] == kwargs["final"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(final=1.5), "final"),
        (dict(final=-0.1), "final"),
        (dict(final=0.5, initial=0.6), "initial"),
        (dict(final=0.5, initial=-1), "initial"),
        (dict(final=0.5, start=0), "start"),
        (dict(final=0.5, start=5, end=5), "end"),
        (dict(final=0.5, frequency=0), "frequency"),
        (dict(final=0.5, exponent=0), "exponent"),
        (dict(final=0.5, start=1.5), "start"),
    ],
)
def test_cubic_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CubicSchedule(**kwargs)


def test_fraction_schedule():
    """The first pruning comes after f rounds, as in the authors' code (rounds f, 2f, ...)."""
    s = FractionSchedule(fraction=0.04, frequency=2, start=1)
    assert s(0) == 0.0 and s(1) == 0.0
    assert s(2) == pytest.approx(0.04) and s(3) == pytest.approx(0.04)
    assert s(4) == pytest.approx(1 - 0.96**2)
    assert s(40) == pytest.approx(1 - 0.96**20)
    assert [t for t in range(1, 10) if s(t) != s(t - 1)] == [2, 4, 6, 8]
    s = FractionSchedule(fraction=0.02, frequency=4, start=1)
    assert [s(t) for t in range(1, 10)] == pytest.approx([0, 0, 0, 0.02, 0.02, 0.02, 0.02, 1 - 0.98**2, 1 - 0.98**2])


def test_fraction_schedule_start_and_cap():
    s = FractionSchedule(fraction=0.5, frequency=1, start=3, final=0.8)
    assert [s(t) for t in range(1, 7)] == pytest.approx([0.0, 0.0, 0.5, 0.75, 0.8, 0.8])
    assert s(5) != s(4) and s(6) == s(5)


def test_fraction_validation():
    for kwargs, field in [
        (dict(fraction=0.0), "fraction"),
        (dict(fraction=1.2), "fraction"),
        (dict(fraction=0.1, frequency=0), "frequency"),
        (dict(fraction=0.1, start=0), "start"),
        (dict(fraction=0.1, final=2), "final"),
    ]:
        with pytest.raises(ValueError, match=field):
            FractionSchedule(**kwargs)


def test_one_shot():
    s = OneShotSchedule(final=0.9, round=3)
    assert [s(t) for t in range(1, 6)] == [0.0, 0.0, 0.9, 0.9, 0.9]
    assert [t for t in range(1, 6) if s(t) != s(t - 1)] == [3]
    assert OneShotSchedule(0.9)(1) != OneShotSchedule(0.9)(0)
    with pytest.raises(ValueError, match="round"):
        OneShotSchedule(0.9, round=0)
    with pytest.raises(ValueError, match="final"):
        OneShotSchedule(1.1)


def test_constant():
    assert ConstantSchedule()(7) == 0.0
    s = ConstantSchedule(0.95)
    assert s(1) == s(40) == 0.95
    assert not any(s(t) != s(t - 1) for t in range(1, 10))
    with pytest.raises(ValueError, match="value"):
        ConstantSchedule(-0.5)


def test_round_validation_and_frozen():
    s = CubicSchedule(final=0.9)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="round"):
            s(bad)
    with pytest.raises(AttributeError):
        s.final = 0.5
    assert s == CubicSchedule(final=0.9) and hash(s) == hash(CubicSchedule(final=0.9))


def test_cubic_with_initial_equal_to_final_holds_it_from_the_start_round():
    s = CubicSchedule(final=0.5, initial=0.5, start=2, end=4)
    assert [s(t) for t in range(1, 6)] == [0.0, 0.5, 0.5, 0.5, 0.5]
