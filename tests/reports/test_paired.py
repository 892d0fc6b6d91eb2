"""Paired differences with t-intervals, checked against hand computations and printed t tables."""

from __future__ import annotations

import math

import pytest

from adaptor_peft.reports import paired_difference
from adaptor_peft.reports.paired import t_quantile, t_two_sided


def test_t_quantile_and_paired_interval_match_hand_computation():
    # Student's t 97.5 % quantiles from a printed table
    for df, t in [(1, 12.706), (2, 4.303), (3, 3.182), (10, 2.228), (30, 2.042), (120, 1.980)]:
        assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-3)
    assert t_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 1/2
    # a - b = 2, 3, 2, 3: mean 2.5, sd sqrt(1/3), se sqrt(1/3)/2, t(0.975, 3) = 3.182446
    difference = paired_difference([3, 5, 4, 6], [1, 2, 2, 3])
    half = 3.182446305 * math.sqrt(1 / 3) / 2
    assert difference.mean == 2.5 and difference.n == 4
    assert (difference.low, difference.high) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert not difference.within_noise
    assert paired_difference([3, 1, 4], [1, 2, 3]).within_noise  # differences 2, -1, 1: the interval holds 0
    with pytest.raises(ValueError, match="2 or more"):
        paired_difference([1.0], [2.0])
