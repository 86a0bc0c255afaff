"""The zoo benchmark's table: hit rate, false-alarm rate, ROC-AUC and right-target rate per
attack family, for the calibrated scanner and for the detector before it.

Only models that count are used: every clean model, and backdoored ones whose attack succeeds
(ASR >= zoo min_asr; the others are listed). A model's score for the ROC curve is 1 - p for the
scanner (the combined conformal p-value) and the largest decision margin for the old detector;
"TPR at FPR <= 5%" is each one's own decision (p <= alpha; the old fixed thresholds), whose
false-alarm rate on the test zoo's clean models is reported beside it. Rates carry 95% Wilson
intervals: with a few dozen models they are wide, and say so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from mesa_lib.calibration import Calibration

Truth = dict[str, dict[str, Any]]


def class_scores(record: dict[str, Any]) -> dict[str, dict[int, float]]:
    """detector -> class -> score of a scan record (JSON keys back to ints)."""
    return {d: {int(c): v for c, v in s["scores"].items()}
            for d, s in record["detectors"].items()}


def p_value(calibration: Calibration, record: dict[str, Any]) -> tuple[float, str, int]:
    """(combined p-value, the detector with the smallest p, its suspected class) of a record."""
    stats = {d: calibration.statistic(d, s) for d, s in class_scores(record).items()
             if d in calibration.detectors}
    p, fired = calibration.combined({d: s[0] for d, s in stats.items()})
    return p, fired, stats[fired][1]


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion hits / n."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def auc(positive: list[float], negative: list[float]) -> float:
    """ROC-AUC as P(score of a positive > score of a negative), ties counting one half."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def targets_of(truth: dict[str, Any]) -> list[int]:
    """Every target class a truth record's triggers were planted for (two with `also`)."""
    return truth.get("targets") or [truth["target"]]


def attack_text(attack: dict[str, Any]) -> str:
    """A truth record's attack in a few words: a patch by its trigger, size, place and rate;
    any other attack by its name and settings."""
    if {"trigger", "size", "location"} <= set(attack) and attack["size"] < 32:
        return (f"{attack['trigger']} {attack['size']}x{attack['size']} at "
                f"{attack['location']}, rate {attack.get('rate')}")
    settings = ", ".join(f"{k} {v}" for k, v in attack.items() if k != "name")
    return f"{attack.get('name', 'attack')} ({settings})"


def families(truth: Truth) -> dict[str, Callable[[dict[str, Any]], bool]]:
    """Attack families: name -> predicate on a backdoored model's truth record. The patch
    families read a patch attack's settings (size, location, trigger, rate); an attack without
    them is in none of those, and still in "all backdoors" and its planting."""
    def setting(t: dict[str, Any], key: str) -> Any:
        return t["attack"].get(key)

    def patch(t: dict[str, Any]) -> bool:
        return isinstance(setting(t, "size"), int) and setting(t, "size") < 32

    rows = {"patch attacks (all)": patch,
            "fixed place": lambda t: patch(t) and setting(t, "location") != "random",
            "random place": lambda t: patch(t) and setting(t, "location") == "random"}
    rows |= {f"size {k}x{k}": (lambda t, k=k: patch(t) and setting(t, "size") == k)
             for k in (2, 3, 4, 5)}
    rows |= {"black/white": lambda t: patch(t) and setting(t, "trigger") == "bw",
             "random colour": lambda t: patch(t) and setting(t, "trigger") == "random_color",
             "rate <= 3%": lambda t: patch(t) and setting(t, "rate") <= 0.03,
             "rate 5%": lambda t: patch(t) and setting(t, "rate") == 0.05,
             "rate >= 10%": lambda t: patch(t) and setting(t, "rate") >= 0.10,
             "planted while fine-tuning a base": lambda t: patch(t) and t.get("base") is not None,
             "planted while training from scratch": lambda t: patch(t) and t.get("base") is None,
             "ResNet-20": lambda t: patch(t) and t["arch"] == "resnet20",
             "blended (whole image)": lambda t: setting(t, "size") == 32,
             "all backdoors": lambda t: True}
    return rows


def _scores(truth: Truth, scans: dict[str, Any], calibration: Calibration
            ) -> dict[str, dict[str, Any]]:
    """Per model: new (score, flagged, target) and before (score, flagged, target)."""
    out = {}
    for name, rec in scans.items():
        p, fired, target = p_value(calibration, rec)
        out[name] = {"new": (1 - p, p <= calibration.alpha, target, fired),
                     "before": (rec["before"]["margin"], rec["before"]["status"] == "backdoored",
                                rec["before"]["target"], "mesa")}
    return out


def _row(label: str, bd: list[str], clean: list[str], truth: Truth,
         scores: dict[str, dict[str, Any]], which: str) -> str:
    pos = [scores[n][which][0] for n in bd]
    neg = [scores[n][which][0] for n in clean]
    hits = [n for n in bd if scores[n][which][1]]
    right = [n for n in hits if scores[n][which][2] in targets_of(truth[n])]
    lo, hi = wilson(len(hits), len(bd))
    target = f"{len(right)}/{len(hits)}" if hits else "-"
    return (f"| {label} | {len(bd)} | {auc(pos, neg):.3f} | {len(hits)}/{len(bd)} "
            f"({len(hits) / max(len(bd), 1):.0%}; {lo:.0%}-{hi:.0%}) | {target} |")


def _each_detector(truth: Truth, scans: dict[str, Any], calibration: Calibration,
                   clean: list[str], bd: list[str]) -> list[str]:
    """Each detector alone (its own conformal p <= alpha): what the combination adds."""
    lines = ["## Each detector alone", "",
             "Its own conformal p-value against the calibration's clean models, flagged at p <= "
             f"{calibration.alpha} (the combination above corrects for using two).", "",
             "| detector | ROC-AUC, all backdoors | detected | false alarms | right target |",
             "|---|---|---|---|---|"]
    for d in calibration.detectors:
        stat = {n: calibration.statistic(d, class_scores(scans[n])[d]) for n in scans}
        flag = {n: calibration.detector_p(d, stat[n][0]) <= calibration.alpha for n in scans}
        hits = [n for n in bd if flag[n]]
        right = sum(stat[n][1] in targets_of(truth[n]) for n in hits)
        lines.append(f"| {d} | {auc([stat[n][0] for n in bd], [stat[n][0] for n in clean]):.3f}"
                     f" | {len(hits)}/{len(bd)} | {sum(flag[n] for n in clean)}/{len(clean)} | "
                     f"{right}/{len(hits)} |")
    return lines + [""]


def markdown(truth: Truth, scans: dict[str, Any], calibration: Calibration, command: str,
             machine: str) -> str:
    """The whole benchmark file."""
    scores = _scores(truth, scans, calibration)
    clean = [n for n in scans if not truth[n]["backdoored"]]
    bd = [n for n in scans if truth[n]["backdoored"] and truth[n]["counts"]]
    weak = [n for n in scans if truth[n]["backdoored"] and not truth[n]["counts"]]
    lines = ["# Scanner benchmark on the test zoo", "",
             f"- command: `{command}` (the `benchmark` stage of zoo/dvc.yaml)",
             "- calibration: zoo/calibration.json (released as calibration/scanner.json), "
             "fitted on the calibration zoo's "
             f"{len(calibration.combined_null)} clean models only (alpha "
             f"{calibration.alpha}); the test zoo shares no base model with it and was scanned "
             "only here",
             f"- test zoo: {len(clean)} clean models, {len(bd)} backdoored models whose attack "
             f"succeeds (ASR >= 80%); left out: {', '.join(weak) or 'none'}",
             f"- machine: {machine}", ""]
    for which, title in (("new", "Calibrated scanner (this release)"),
                         ("before", "Detector before this release")):
        false = [n for n in clean if scores[n][which][1]]
        lo, hi = wilson(len(false), len(clean))
        lines += [f"## {title}", "",
                  f"False alarms on the {len(clean)} clean test models: {len(false)} "
                  f"({len(false) / max(len(clean), 1):.1%}; 95% interval {lo:.0%}-{hi:.0%})"
                  + (f": {', '.join(false)}" if false else ""), "",
                  "| family | backdoored models | ROC-AUC | detected (TPR; 95% interval) | "
                  "right target |", "|---|---|---|---|---|"]
        for label, keep in families(truth).items():
            members = [n for n in bd if keep(truth[n])]
            if members:
                lines.append(_row(label, members, clean, truth, scores, which))
        lines.append("")
        if which == "new":
            fired: dict[str, int] = {}
            for n in bd:
                if scores[n]["new"][1]:
                    fired[scores[n]["new"][3]] = fired.get(scores[n]["new"][3], 0) + 1
            lines += ["Detector that fired, over the detections: " + ", ".join(
                f"{d} {k}" for d, k in sorted(fired.items())), ""]
    lines += _each_detector(truth, scans, calibration, clean, bd)
    new_s = [scans[n]["seconds"] for n in scans]
    old_s = [scans[n]["before"]["seconds"] for n in scans]
    lines += ["## Scan time per model", "",
              "| scanner | median s | max s |", "|---|---|---|",
              f"| calibrated scanner | {statistics.median(new_s):.1f} | {max(new_s):.1f} |",
              f"| before | {statistics.median(old_s):.1f} | {max(old_s):.1f} |", "",
              "## Per model", "",
              "| model | truth | ASR | scanner p | scanner verdict | before |",
              "|---|---|---|---|---|---|"]
    for n in scans:
        t = truth[n]
        what = f"target {t['target']}, {attack_text(t['attack'])}" if t["backdoored"] \
            else "clean"
        if t.get("also"):
            also = {("name" if k == "attack" else k): v for k, v in t["also"].items()
                    if k != "target"}
            what += f"; and target {t['also']['target']}, {attack_text(also)}"
        new, old = scores[n]["new"], scores[n]["before"]
        asr = "-" if t["asr"] is None else f"{t['asr']:.0%}"
        lines.append(f"| {n} | {what} | {asr} | {1 - new[0]:.3f} | "
                     f"{'backdoored ' + str(new[2]) if new[1] else 'clean'} | "
                     f"{'backdoored ' + str(old[2]) if old[1] else 'clean'} |")
    return "\n".join(lines) + "\n"
