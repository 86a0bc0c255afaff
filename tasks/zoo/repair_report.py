"""The repair benchmark's table (tasks.zoo.repair): per method and family, intervals over models.

Residual = the true trigger's ASR after the repair minus its ASR on clean models, in points;
intervals are 95% percentile bootstraps of the mean over models (10,000 resamples, seeded), and
Wilson intervals for shares. MESA is compared with each control on the same models (paired).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from tasks.zoo.report import families, wilson

Rows = dict[str, dict[str, Any]]  # model -> method -> its repair row (+ the model's record)


def bootstrap(values: Sequence[float], resamples: int = 10_000, seed: int = 0
              ) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the resampled means)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    return statistics.fmean(values), means[int(0.025 * resamples)], means[int(0.975 * resamples)]


def _pts(x: tuple[float, float, float]) -> str:
    return f"{100 * x[0]:+.1f} [{100 * x[1]:+.1f}, {100 * x[2]:+.1f}]"


def residual(record: dict[str, Any], row: dict[str, Any]) -> float:
    """The repair's residual: the largest, over the planted triggers, of a trigger's ASR after
    the repair minus its ASR on clean models (a record of one trigger: that one's)."""
    if "asrs" in row and "clean_asrs" in record:
        return max(a - c for a, c in zip(row["asrs"], record["clean_asrs"], strict=True))
    return row["asr"] - record["clean_asr"]


def by_method(records: dict[str, dict[str, Any]]) -> dict[str, Rows]:
    """method -> model -> row with `residual`, `accuracy_change` and the model's record."""
    out: dict[str, Rows] = {}
    for name, rec in records.items():
        for row in rec["repairs"]:
            out.setdefault(row["method"], {})[name] = row | {
                "residual": residual(rec, row),
                "accuracy_change": row["accuracy"] - rec["truth"]["clean_accuracy"],
                "cleared": row["outcome"]["verdict"] == "clean", "record": rec}
    return out


def _summary(method: str, rows: Rows) -> str:
    res = [r["residual"] for r in rows.values()]
    acc = [r["accuracy_change"] for r in rows.values()]
    within = sum(x <= 0.02 for x in res)
    lo, hi = wilson(within, len(res))
    cleared = [r for r in rows.values() if r["cleared"]]
    false = [n for n, r in rows.items() if r["cleared"] and r["residual"] > 0.10]
    secs = [r["seconds"] for r in rows.values()]
    return (f"| {method} | {len(res)} | {_pts(bootstrap(res))} | {within}/{len(res)} "
            f"({lo:.0%}-{hi:.0%}) | {100 * statistics.median(acc):+.1f} / "
            f"{100 * min(acc):+.1f} | {len(cleared)}/{len(res)} | {len(false)}"
            f"{' (' + ', '.join(false) + ')' if false else ''} | "
            f"{statistics.median(secs):.0f} / {max(secs):.0f} |")


def _paired(methods: dict[str, Rows]) -> list[str]:
    lines = ["## MESA against each control (paired, same models)", "",
             "| control | models | MESA residual minus the control's (points) |", "|---|---|---|"]
    for control, rows in methods.items():
        if control == "mesa":
            continue
        both = sorted(set(rows) & set(methods["mesa"]))
        diff = [methods["mesa"][n]["residual"] - rows[n]["residual"] for n in both]
        if diff:
            lines.append(f"| {control} | {len(diff)} | {_pts(bootstrap(diff))} |")
    return lines + [""]


def _families(methods: dict[str, Rows]) -> list[str]:
    names = list(methods)
    lines = ["## Residual by family (points, mean over models)", "",
             "| family | models | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    truth = {n: r["record"]["truth"] for rows in methods.values() for n, r in rows.items()}
    for label, keep in families(truth).items():
        members = [n for n in truth if keep(truth[n])]
        if members:
            cells = [f"{100 * statistics.fmean(methods[m][n]['residual'] for n in members):+.1f}"
                     for m in names]
            lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _points(share: float) -> float:
    """A share in points, rounded off float noise (0.70 - 0.69 is 1 point, not 1.0000001)."""
    return round(100 * share, 6)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets(records: dict[str, dict[str, Any]], methods: dict[str, Rows]) -> list[str]:
    """Issue 22's targets for MESA's repair, each judged met / NOT met from the records."""
    rows = methods.get("mesa", {})
    if not rows:
        return []
    res = {n: r["residual"] for n, r in rows.items()}
    acc = [-r["accuracy_change"] for r in rows.values()]  # loss, in [0, 1]
    within = sum(x <= 0.02 for x in res.values())
    false = [n for n, r in rows.items() if r["cleared"] and r["residual"] > 0.10]
    unrepaired = [n for n, r in rows.items()
                  if {t["target"] for t in r["outcome"]["targets"]}
                  != set(r["record"]["scan"]["targets"])]
    r8 = [r["seconds"] for r in rows.values() if r["record"]["truth"].get("arch") == "resnet8"]
    lines = ["## Targets (MESA's repair)", "", "| target | measured | |", "|---|---|---|",
             f"| true-trigger ASR within 2 points of the clean models' for >= 90% | "
             f"{within}/{len(res)} | {_verdict(within >= 0.9 * len(res))} |",
             f"| median clean-accuracy loss <= 1 point | {100 * statistics.median(acc):.1f} | "
             f"{_verdict(_points(statistics.median(acc)) <= 1)} |",
             f"| no accuracy loss over 3 points | worst {100 * max(acc):.1f} | "
             f"{_verdict(_points(max(acc)) <= 3)} |",
             f"| zero false clearances (cleared, > 10 points above clean) | {len(false)} | "
             f"{_verdict(not false)} |",
             f"| every flagged target repaired | {len(rows) - len(unrepaired)}/{len(rows)} | "
             f"{_verdict(not unrepaired)} |"]
    control = methods.get("unlearn", {})
    both = sorted(set(rows) & set(control))
    if both:
        diff = bootstrap([res[n] - control[n]["residual"] for n in both])
        lines.append(f"| MESA's residual below the single-trigger control's, paired interval "
                     f"excluding 0 | {_pts(diff)} | {_verdict(diff[2] < 0)} |")
    if r8:  # these runs share the cores (one thread each, a second job beside): not a timing
        lines.append(f"| a repair within 3 minutes per ResNet-8 (2 cores, nothing else "
                     f"running) | judged by benchmarks/repair_time.py, not here: these runs "
                     f"(one thread, beside another job) took at most {max(r8):.0f} s | - |")
    return lines + [""]


def markdown(records: dict[str, dict[str, Any]], budget: dict[str, Any], command: str) -> str:
    """The whole benchmark file."""
    missed = [n for n, r in records.items() if r["scan"]["verdict"] != "backdoored"]
    methods = by_method(records)
    lines = ["# Repair benchmark on the test zoo", "", f"- command: `{command}`",
             f"- budget (chosen on the calibration zoo, zoo/repair_budget.json): {budget}",
             f"- working backdoors: {len(records)}; not detected (not repaired): "
             f"{', '.join(missed) or 'none'}",
             "- residual: the TRUE trigger's ASR after the repair minus its ASR on clean "
             "models (truth images, never seen by the scan or the repair); 95% bootstrap "
             "intervals over models", "",
             "| method | models | residual (points) | within 2 points | accuracy change, median "
             "/ worst (points) | cleared by verification | false clearances (> 10 points) | "
             "seconds, median / max |", "|---|---|---|---|---|---|---|---|"]
    lines += [_summary(m, rows) for m, rows in methods.items()] + [""]
    lines += targets(records, methods)
    lines += _paired(methods) + _families(methods)
    react = [r["reactivated_asr"] - r["record"]["clean_asr"]
             for r in methods.get("mesa", {}).values() if r.get("reactivated_asr") is not None]
    if react:
        lines += ["## Re-activation", "", "MESA-repaired models fine-tuned one epoch on their "
                  "repair images with 1% poisoned: true-trigger ASR minus the clean models' "
                  f"own: {_pts(bootstrap(react))} points over {len(react)} models.", ""]
    lines += ["## Per model", "", "| model | ASR before | clean models' | " +
              " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for name, rec in records.items():
        cells = [_cell(methods[m].get(name)) for m in methods]
        lines.append(f"| {name} | {100 * rec['truth']['asr']:.1f} | "
                     f"{100 * rec['clean_asr']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any] | None, fmt: Callable[[float], str] = lambda x: f"{100 * x:.1f}"
          ) -> str:
    if row is None:
        return "-"
    return f"{fmt(row['asr'])} ({'cleared' if row['cleared'] else 'quarantined'})"
