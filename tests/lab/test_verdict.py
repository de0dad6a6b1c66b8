"""The interval math every rule shares: the 95% t-interval and the three-way verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from bnorm.lab.verdict import (
    MIN_SEEDS,
    Decision,
    all_of,
    check,
    interval_text_json,
    t_interval,
)

values = st.lists(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=2, max_size=12
)


@settings(max_examples=100, deadline=None)
@given(values)
def test_t_interval_matches_scipys_one_sample_t_test(xs):
    mean, low, high = t_interval(xs)
    assert mean == pytest.approx(np.mean(xs), abs=1e-9)
    if np.std(xs) < 1e-9:  # identical values: a zero-width interval (scipy gives NaN)
        assert high - low == pytest.approx(0.0, abs=1e-6)
        return
    ci = stats.ttest_1samp(xs, 0.0).confidence_interval(0.95)
    assert low == pytest.approx(ci.low, rel=1e-7, abs=1e-7)
    assert high == pytest.approx(ci.high, rel=1e-7, abs=1e-7)


def test_t_interval_of_one_value_is_unbounded_and_non_finite_values_are_refused():
    mean, low, high = t_interval([0.3])
    assert mean == 0.3 and low == -math.inf and high == math.inf
    with pytest.raises(ValueError, match="non-finite"):
        t_interval([0.1, float("nan")])


@settings(max_examples=100, deadline=None)
@given(values, st.floats(min_value=-1e3, max_value=1e3), st.sampled_from(["above", "below"]))
def test_check_verdict_follows_the_interval(xs, margin, side):
    c = check("x", xs, margin, side)
    beyond, short = (c.low > margin, c.high < margin)
    if side == "below":
        beyond, short = short, beyond
    expected = "supported" if beyond else "not supported" if short else "inconclusive"
    assert c.verdict == (expected if len(xs) >= MIN_SEEDS else "inconclusive")
    assert c.n == len(xs) and list(c.values) == [float(v) for v in xs]


def test_more_seeds_narrow_the_interval_until_it_decides():
    """The same spread over more seeds: inconclusive at 3 seeds, supported at 12."""
    pattern = [0.01, 0.05, 0.09]
    assert check("d", pattern, 0.02, "above").verdict == "inconclusive"
    assert check("d", pattern * 4, 0.02, "above").verdict == "supported"


def test_two_seeds_never_decide():
    """Two seeds with the same paired value (a coincidence discrete accuracies make likely)
    give a zero-width interval: no evidence, so inconclusive."""
    assert MIN_SEEDS == 3
    assert check("d", [0.828, 0.828], 0.05, "above").verdict == "inconclusive"
    assert check("d", [0.828, 0.828, 0.828], 0.05, "above").verdict == "supported"


def test_all_of_needs_every_check():
    win = check("a", [1.0, 1.1, 0.9], 0.0, "above")
    loss = check("b", [-1.0, -1.1, -0.9], 0.0, "above")
    unsure = check("c", [-1.0, 1.0, 0.1], 0.0, "above")
    assert all_of(win, win).verdict == "supported"
    assert all_of(win, unsure).verdict == "inconclusive"
    assert all_of(unsure, loss).verdict == "not supported"
    assert isinstance(win.decision(), Decision) and win.decision().checks == [win]


def test_json_round_trip_keeps_the_text():
    c = check("a", [0.1, 0.2, 0.4], 0.0, "above")
    assert interval_text_json(c.to_json()) == c.interval_text()
    one = check("a", [0.1], 0.0, "above").to_json()
    assert one["low"] is None and one["high"] is None  # JSON has no infinity
    assert interval_text_json(one) == "+0.100 [−∞, ∞]"
