"""95% intervals for what sdrt reports: a percentile bootstrap over examples.

Every figure sdrt quotes about a method (accuracy, agreement, gap closed) is a statistic of
per-example values, so one resampling of examples gives its interval.  The resampling is seeded,
so the same numbers give the same interval on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval (``low``/``high`` None for fewer than 2 examples)."""

    value: float
    low: float | None
    high: float | None
    examples: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "low": self.low, "high": self.high, "examples": self.examples}

    def percent(self) -> str:
        """``"52.7% [41.5, 60.9]"``."""
        if self.low is None or self.high is None:
            return f"{100 * self.value:.1f}%"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def bootstrap(
    items: Sequence[T],
    statistic: Callable[[Sequence[T]], float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """``statistic(items)`` with the percentile interval of ``statistic`` over ``resamples`` resamplings of
    the items (with replacement).  Items are whole examples, so paired quantities (a student's and the
    base model's KL on the same example) stay paired."""
    items = list(items)
    if not items:
        raise ValueError("cannot estimate a statistic of no examples")
    value = float(statistic(items))
    if len(items) < 2:
        return Estimate(value, None, None, len(items))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(items), size=(resamples, len(items)))
    values = np.array([statistic([items[i] for i in row]) for row in draws], dtype=float)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Estimate(value, float(low), float(high), len(items))


def mean_of(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def mean_interval(values: Sequence[float], **options) -> Estimate:
    """The mean of per-example values (a 0/1 score: accuracy or agreement) with its interval."""
    return bootstrap([float(v) for v in values], mean_of, **options)


def gap_closed_interval(student_kl: Sequence[float], base_kl: Sequence[float], **options) -> Estimate:
    """``1 − Σ KL_student / Σ KL_base`` over paired examples, with its interval."""
    if len(student_kl) != len(base_kl):
        raise ValueError(f"{len(student_kl)} student KLs but {len(base_kl)} base KLs: the examples must be paired")

    def gap(pairs):
        base = sum(b for _, b in pairs)
        return 1.0 - sum(s for s, _ in pairs) / base if base > 0 else float("nan")

    return bootstrap(list(zip(student_kl, base_kl)), gap, **options)
