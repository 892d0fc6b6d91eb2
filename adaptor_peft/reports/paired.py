"""Paired comparisons of two methods: the mean difference over matched runs with a t-interval.

Two methods trained on the same task, data seed and training seed make a pair; their difference removes
what the pair shares (how hard the task and that draw of data are), so a gap is judged against the spread
of the differences, not of the scores. Student's t quantile is computed exactly for whole degrees of
freedom (Abramowitz & Stegun 26.7.3-4), so no statistics package is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple


class PairedDifference(NamedTuple):
    """Mean of ``a - b`` over ``n`` pairs and its ``level`` confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def within_noise(self) -> bool:
        """Does the interval hold 0, i.e. is the sign of the difference not established?"""
        return self.low <= 0 <= self.high

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**self._asdict(), "within_noise": self.within_noise}


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with ``df`` (a whole number >= 1) degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, df // 2):  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with P(|T| <= t) = ``level`` (e.g. 12.706 for 0.95 and one degree of freedom), by bisection."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < level < 1 and df >= 1, got level={level}, df={df}")
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < level:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided(middle, df) < level else (low, middle)
    return (low + high) / 2


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean of ``a[i] - b[i]`` with its two-sided t-interval at ``level``; needs at least 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equally long sequences of 2 or more, got {len(a)}, {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(differences)
    half = t_quantile(level, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return PairedDifference(mean, mean - half, mean + half, len(differences), level)
