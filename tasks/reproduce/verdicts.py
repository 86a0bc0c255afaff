"""The verdicts of the reproduction, by the analysis plan fixed before the 10-seed grid ran
(docs/reproduction.md, "Analysis plan"; issue 26).

The unit is the seed: a seed's value is the mean over its cells (they share its clean model).
Each verdict's primary test is a two-sided 95% Student t-interval on the seed means (for a
paired comparison, on the seed means of the per-cell differences); the hierarchical bootstrap
(seeds, then cells) is shown beside it. A verdict is *met* when the primary interval lies wholly
on the target's side of its threshold, *not met* when wholly on the other side, *inconclusive*
otherwise, and also when the primary and the bootstrap interval fall on different sides. The
"MESA better than X" comparisons are one family, corrected with Holm's method at 5%.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesa_lib.stats import Interval, TInterval, bootstrap_mean, holm, t_interval

POINTS = 100
RESIDUAL = 0.005        # MESA's residual over the floor: upper end at most +0.5 points
ACCURACY = 0.005        # accuracy change against the backdoored model: within +-0.5 points
MINE_RISE = 0.02        # nats: MINE's last-epoch rise below this counts as converged
# "MESA better than X": the family of comparisons (display name -> method key)
RIVALS = ("point mixture", "point mixture 10x10", "Neural Cleanse", "uniform patch",
          "b/w patch", "no trigger")

Value = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Judged:
    """A target's primary and secondary intervals and its verdict."""

    label: str
    primary: TInterval
    secondary: Interval
    verdict: str


def seed_means(cells: list[dict[str, Any]], value: Value) -> list[float]:
    """One mean per seed of value(cell) over the seed's cells that have it."""
    per: dict[int, list[float]] = defaultdict(list)
    for c in cells:
        v = value(c)
        if v is not None:
            per[c["seed"]].append(v)
    return [sum(v) / len(v) for _, v in sorted(per.items())]


def intervals(cells: list[dict[str, Any]], value: Value
              ) -> tuple[TInterval, Interval] | None:
    """(t-interval on the seed means, hierarchical bootstrap over the cells); None if fewer
    than 2 seeds hold the value."""
    means = seed_means(cells, value)
    if len(means) < 2:
        return None
    pairs = [(v, c["seed"]) for c in cells if (v := value(c)) is not None]
    boot = bootstrap_mean([v for v, _ in pairs], groups=[s for _, s in pairs])
    return t_interval(means), boot


def side(iv: Interval, low: float, high: float) -> str:
    """'in' if the interval lies inside [low, high], 'out' if wholly outside it, else 'across'."""
    if low <= iv.low and iv.high <= high:
        return "in"
    if iv.high < low or iv.low > high:
        return "out"
    return "across"


def verdict(primary: Interval, secondary: Interval, low: float, high: float) -> str:
    """met / not met / inconclusive for a target region [low, high] (module docstring)."""
    a, b = side(primary, low, high), side(secondary, low, high)
    if a == "across":
        return "inconclusive"
    if b != a:
        return "inconclusive (the bootstrap disagrees)"
    return "met" if a == "in" else "not met"


def _get(cell: dict[str, Any], method: str, key: str) -> float | None:
    m = cell["evaluation"].get(method)
    return None if m is None else m.get(key)


def _diff(a: Value, b: Value) -> Value:
    def value(c: dict[str, Any]) -> float | None:
        x, y = a(c), b(c)
        return None if x is None or y is None else x - y
    return value


def residual_over(floor: str) -> Value:
    """MESA's ASR after repair minus a floor: the clean model's own ASR for the trigger
    (`clean`), or the repaired model's own with a random pattern at the same places."""
    mesa = lambda c: _get(c, "MESA ensemble", "asr")  # noqa: E731
    if floor == "clean":
        return _diff(mesa, lambda c: _get(c, "clean", "asr"))
    return _diff(mesa, lambda c: _get(c, "MESA ensemble", "floor_random_pattern"))


def judge(cells: list[dict[str, Any]]) -> list[Judged]:
    """Every pre-registered target that the cells can speak to."""
    out = []
    regions: list[tuple[str, Value, float, float]] = [
        ("MESA's residual over the repaired model's own floor (random pattern, same places)",
         residual_over("repaired"), float("-inf"), RESIDUAL),
        ("MESA's residual over the clean model's ASR for the trigger",
         residual_over("clean"), float("-inf"), RESIDUAL),
        ("accuracy, MESA minus backdoored, within +-0.5 points (the original wording)",
         _diff(lambda c: _get(c, "MESA ensemble", "clean_acc"),
               lambda c: _get(c, "backdoored", "clean_acc")), -ACCURACY, ACCURACY),
        ("accuracy, MESA minus backdoored, at least -0.5 points (one-sided; reworded after the "
         "selection's validation figures were seen)",
         _diff(lambda c: _get(c, "MESA ensemble", "clean_acc"),
               lambda c: _get(c, "backdoored", "clean_acc")), -ACCURACY, float("inf"))]
    for label, value, low, high in regions:
        got = intervals(cells, value)
        if got is not None:
            out.append(Judged(label, *got, verdict(*got, low, high)))
    return out


def rivals(cells: list[dict[str, Any]]) -> list[tuple[str, TInterval, Interval, str]]:
    """MESA minus each rival's ASR: (rival, t-interval, bootstrap, verdict after Holm)."""
    rows = []
    for rival in RIVALS:
        got = intervals(cells, _diff(lambda c: _get(c, "MESA ensemble", "asr"),
                                     lambda c, r=rival: _get(c, r, "asr")))
        if got is not None:
            rows.append((rival, *got))
    kept = holm([t.p_value for _, t, _ in rows])
    out = []
    for (rival, t, boot), rejected in zip(rows, kept, strict=True):
        if not rejected:
            v = "no difference shown (Holm)"
        elif t.high < 0 and boot.high < 0:
            v = "MESA better"
        elif t.low > 0 and boot.low > 0:
            v = "MESA worse"
        else:
            v = "inconclusive (the bootstrap disagrees)"
        out.append((rival, t, boot, v))
    return out


def _fmt(iv: Interval) -> str:
    return f"{iv.mean * POINTS:+.2f} [{iv.low * POINTS:+.2f}, {iv.high * POINTS:+.2f}]"


def table(cells: list[dict[str, Any]]) -> list[str]:
    """The verdicts as markdown: targets, then the family of comparisons."""
    judged, compared = judge(cells), rivals(cells)
    if not judged and not compared:
        return ["Verdicts: fewer than 2 seeds hold MESA's figures; none stated."]
    n = len({c["seed"] for c in cells})
    rows = [f"Verdicts by the pre-registered analysis ({n} seeds; primary: t-interval on the "
            "seed means; beside it the hierarchical bootstrap; points):", "",
            "| target | primary (t, seeds) | bootstrap (seeds, cells) | verdict |",
            "|---|---|---|---|"]
    rows += [f"| {j.label} | {_fmt(j.primary)} | {_fmt(j.secondary)} | {j.verdict} |"
             for j in judged]
    if compared:
        rows += ["", "MESA minus each rival, ASR (negative: MESA leaves less backdoor); Holm "
                 "over the family at 5%:", "",
                 "| rival | primary (t) | p | bootstrap | verdict |", "|---|---|---|---|---|"]
        rows += [f"| {r} | {_fmt(t)} | {t.p_value:.3f} | {_fmt(b)} | {v} |"
                 for r, t, b, v in compared]
    return rows


def staircase(cells: list[dict[str, Any]]) -> list[str]:
    """Per beta: the share of cells whose sub-model's mean target probability reached beta at
    the end of the fit, and the share where MINE's estimate had converged (last-epoch rise
    below MINE_RISE nats)."""
    reached: dict[float, list[bool]] = defaultdict(list)
    settled: dict[float, list[bool]] = defaultdict(list)
    for c in cells:
        log = c.get("fits", {}).get("mesa_log")
        betas = c.get("settings", {}).get("mesa", {}).get("betas")
        if not log or not betas:
            continue
        last = log[-1]
        for i, beta in enumerate(betas):
            reached[beta].append(last["target_prob"][i] >= beta)
            if len(log) >= 2:
                settled[beta].append(last["mutual_info"][i] - log[-2]["mutual_info"][i]
                                     < MINE_RISE)
    if not reached:
        return []
    rows = ["| sub-model | reached its beta (cells) | MINE converged (cells) |", "|---|---|---|"]
    for beta in sorted(reached, reverse=True):
        r, s = reached[beta], settled[beta]
        rows.append(f"| beta={beta:g} | {sum(r)} of {len(r)} | {sum(s)} of {len(s)} |")
    return rows
