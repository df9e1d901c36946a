"""The bootstrap intervals on hand-worked cases."""

import math

import pytest

from sdrt_cli.stats import Estimate, bootstrap, gap_closed_interval, mean_interval


def test_mean_interval_brackets_the_mean_and_is_reproducible():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]  # 7/10
    first = mean_interval(values)
    assert first.value == pytest.approx(0.7)
    assert first.low < 0.7 < first.high
    # binomial standard error sqrt(.7 * .3 / 10) = 0.145: a 95% interval spans roughly +-0.28
    assert 0.4 <= first.low <= 0.5 and 0.9 <= first.high <= 1.0
    assert mean_interval(values) == first  # seeded


def test_constant_values_have_a_zero_width_interval():
    assert mean_interval([1, 1, 1, 1]) == Estimate(1.0, 1.0, 1.0, 4)


def test_one_example_has_no_interval_and_none_is_refused():
    assert mean_interval([1]) == Estimate(1.0, None, None, 1)
    assert mean_interval([1]).percent() == "100.0%"
    with pytest.raises(ValueError, match="no examples"):
        bootstrap([], len)


def test_gap_closed_is_a_ratio_of_sums_over_paired_examples():
    student = [0.1, 0.2, 0.3]
    base = [0.2, 0.4, 0.4]  # 1 - 0.6 / 1.0
    estimate = gap_closed_interval(student, base)
    assert estimate.value == pytest.approx(0.4)
    # every example closes between 25% and 50% of its own gap, so every resample lies in that range
    assert 0.25 - 1e-9 <= estimate.low <= estimate.high <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="paired"):
        gap_closed_interval([0.1], [0.2, 0.3])


def test_percent_formats_value_and_interval():
    assert Estimate(0.527, 0.415, 0.609, 32).percent() == "52.7% [41.5, 60.9]"
    assert not math.isnan(gap_closed_interval([0.1, 0.1], [0.2, 0.3]).value)
