"""Intervals for results over a few experimental cells: percentile bootstrap.

A reproduction reports each figure as a mean over (pattern, seed) cells with a 95% percentile
bootstrap interval (Efron & Tibshirani 1993, ch. 13): resample the cells with replacement, take
the mean, repeat, read the 2.5% and 97.5% quantiles. Comparisons between two methods are paired:
the per-cell differences are resampled, so what the cells share (model, trigger, data) cancels.

Cells that share a seed share a clean model, so they are not independent draws. With `groups`
(the seed of each cell) the resampling is hierarchical (Davison & Hinkley 1997, sec. 3.8):
resample the seeds with replacement, then the cells within each drawn seed. With few seeds this
gives wider intervals than treating every cell as independent, which is the honest direction.
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
    values: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0,
    groups: Sequence[object] | None = None,
) -> Interval:
    """Mean of `values` with a percentile bootstrap interval at `level`.

    Args:
        values: one number per cell (n >= 1; a single value gives a zero-width interval).
        resamples: bootstrap resamples.
        seed: seed of the resampling (the interval is deterministic).
        groups: optional label per value (e.g. the cell's seed); resample labels, then values
            within each drawn label (module docstring).
    """
    x = torch.as_tensor(list(values), dtype=torch.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty list of numbers, got {list(values)!r}")
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        idx = torch.randint(0, len(x), (resamples, len(x)), generator=gen)
        means = x[idx].mean(1)
    else:
        means = _hierarchical_means(x, list(groups), resamples, gen)
    tail = (1 - level) / 2
    q = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Interval(float(x.mean()), float(q[0]), float(q[1]), len(x))


def _hierarchical_means(x: torch.Tensor, groups: list[object], resamples: int,
                        gen: torch.Generator) -> torch.Tensor:
    """(resamples,) means of two-stage resamples: groups with replacement, then members.

    Each resample draws as many groups as there are, and for each drawn group as many members
    as it has, so a resample weighs the groups like the data do."""
    if len(groups) != len(x):
        raise ValueError(f"need one group per value, got {len(groups)} for {len(x)} values")
    members = [[i for i, g in enumerate(groups) if g == label] for label in dict.fromkeys(groups)]
    sizes = torch.tensor([len(m) for m in members])                     # (G,)
    padded = torch.zeros(len(members), int(sizes.max()), dtype=torch.long)  # (G, S)
    for g, m in enumerate(members):
        padded[g, : len(m)] = torch.tensor(m)
    picked = torch.randint(0, len(members), (resamples, len(members)), generator=gen)  # (R, G)
    size = sizes[picked].unsqueeze(-1)                                  # (R, G, 1)
    u = torch.rand(resamples, len(members), padded.shape[1], generator=gen, dtype=torch.float64)
    pos = (u * size).long()                                             # (R, G, S) within group
    used = torch.arange(padded.shape[1]) < size                         # slots the group has
    vals = x[padded[picked.unsqueeze(-1), pos]] * used
    means = vals.sum((1, 2)) / used.sum((1, 2))
    return means


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 10_000,
    seed: int = 0, groups: Sequence[object] | None = None,
) -> Interval:
    """Mean of a - b over paired cells, with a bootstrap interval of the paired differences."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], level, resamples, seed,
                          groups)


@dataclass(frozen=True)
class TInterval(Interval):
    """A mean with its Student t-interval, and the two-sided p-value of `mean == null`."""

    p_value: float = 1.0


def t_interval(values: Sequence[float], level: float = 0.95, null: float = 0.0) -> TInterval:
    """Mean of `values` (independent units, e.g. one mean per seed) with a two-sided Student t
    interval at `level`, and the one-sample t-test p-value against `null`.

    scipy gives the t quantile and the test (scipy.stats.ttest_1samp): no hand-written copy.
    """
    from scipy import stats

    x = [float(v) for v in values]
    if len(x) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {len(x)}")
    mean = sum(x) / len(x)
    sd = (sum((v - mean) ** 2 for v in x) / (len(x) - 1)) ** 0.5
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * sd / len(x) ** 0.5
    p = 1.0 if sd == 0 and mean == null else (
        0.0 if sd == 0 else float(stats.ttest_1samp(x, null).pvalue))
    return TInterval(mean, mean - half, mean + half, len(x), p)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections (Holm 1979) of a family of p-values at family-wise `alpha`:
    the i-th smallest is rejected while p_(i) <= alpha / (m - i), in order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected
