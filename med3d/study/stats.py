"""The intervals a study reports: a t interval for a cell's mean, a paired bootstrap for a gain."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

Interval = Tuple[float, float]


def mean_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, Interval]:
    """Mean and its two-sided t interval (NaN bounds for fewer than two finite values).

    Args:
        values: one score per replicate (fold or seed).
        level: coverage of the interval.

    Returns:
        ``(mean, (low, high))``.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return math.nan, (math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, (math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, (mean - half, mean + half)


def paired_bootstrap(diffs: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean of paired differences (replicates resampled together).

    Args:
        diffs: per replicate, the other initialisation's score minus the reference's on the same fold/seed.
        n: resamples.
        seed: the resampling seed.
        level: coverage.

    Returns:
        ``(low, high)``; NaN for fewer than two finite differences.
    """
    d = np.asarray([v for v in diffs if v is not None and math.isfinite(v)], dtype=float)
    if len(d) < 2 or n < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
