"""Intervals for results over a few experimental cells: percentile bootstrap.

A reproduction reports each figure as a mean over (pattern, seed) cells with a 95% percentile
bootstrap interval (Efron & Tibshirani 1993, ch. 13): resample the cells with replacement, take
the mean, repeat, read the 2.5% and 97.5% quantiles. Comparisons between two methods are paired:
the per-cell differences are resampled, so what the cells share (model, trigger, data) cancels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.low > 0 or self.high < 0


def bootstrap_mean(
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Mean of `values` with a percentile bootstrap interval at `level`.

    Args:
        values: one number per cell (n >= 1; a single value gives a zero-width interval).
        resamples: bootstrap resamples.
        seed: seed of the resampling (the interval is deterministic).
    """
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty list of numbers, got {list(values)!r}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (resamples, len(x)), generator=gen)
    means = x[idx].mean(1)
    tail = (1 - level) / 2
    q = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Interval(float(x.mean()), float(q[0]), float(q[1]), len(x))


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Mean of a - b over paired cells, with a bootstrap interval of the paired differences."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], level, resamples, seed)
