"""The scanner benchmark's table (benchmarks/results/zoo_detection.md) from the recorded scans:
hit rate, false-alarm rate, ROC-AUC, cross-entropy and right-target rates per attack family, for
the calibrated scanner and for the detector before it.

    python -m tasks.zoo.detection_report     # the `detection_report` stage of zoo/dvc.yaml

Only models that count are used: every clean model, and backdoored ones whose attack succeeds
(ASR >= zoo min_asr; the others are listed). A model's score for the ROC curve is 1 - p for the
scanner (the combined conformal p-value) and the largest decision margin for the old detector;
"detected" is each one's own decision (p <= alpha; the old fixed thresholds), whose false-alarm
rate on the test zoo's clean models is reported beside it. Rates carry 95% Wilson intervals:
with a few dozen models they are wide, and say so. A test model of an architecture the
calibration's clean models do not cover (tasks.scan.coverage) gets no verdict from the shipped
scanner (`uncalibrated`), so it is left out of the rates and listed with its scores.

Cross-entropy is TrojAI's measure: the mean over models of -log q(truth), where q is a
probability that the model is backdoored. A conformal p-value is not one (a clean model's p is
uniform, so 1 - p would cost a clean model 1 nat on average), so q = sigmoid(a + b (-log p)) is
fitted on the calibration zoo's models (clean ones with their leave-one-out p) and only applied
to the test zoo.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from mesa_lib.calibration import Calibration
from tasks.common.io import read_json
from tasks.scan.coverage import coverage_of
from tasks.zoo.build import truth_path
from tasks.zoo.report import (
    Truth,
    attack_text,
    auc,
    class_scores,
    families,
    flagged_targets,
    p_value,
    targets_of,
    wilson,
)

SCANS = Path("zoo/scans")
RESULTS = Path("benchmarks/results/zoo_detection.md")
CALIBRATION = Path("zoo/calibration.json")
CLIP = 1e-12  # TrojAI clips probabilities to [eps, 1 - eps] before the logarithm


def _feature(p: float) -> float:
    return -math.log(p)


def fit_probability(p_values: list[float], backdoored: list[bool], ridge: float = 1e-3,
                    steps: int = 50) -> tuple[float, float]:
    """(a, b) of q = sigmoid(a + b (-log p)) by penalised maximum likelihood.

    Newton's method on two parameters, written out: the project has no scikit-learn, and a
    dependency for a 2 x 2 solve is not worth it. The small ridge keeps (a, b) finite when the
    calibration zoo happens to separate perfectly."""
    x = [_feature(p) for p in p_values]
    y = [1.0 if b else 0.0 for b in backdoored]
    a = b = 0.0
    for _ in range(steps):
        q = [1 / (1 + math.exp(-(a + b * xi))) for xi in x]
        ga = sum(qi - yi for qi, yi in zip(q, y, strict=True)) + ridge * a
        gb = sum((qi - yi) * xi for qi, yi, xi in zip(q, y, x, strict=True)) + ridge * b
        w = [qi * (1 - qi) for qi in q]
        haa = sum(w) + ridge
        hab = sum(wi * xi for wi, xi in zip(w, x, strict=True))
        hbb = sum(wi * xi * xi for wi, xi in zip(w, x, strict=True)) + ridge
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-10:
            break
    return a, b


def probability(model: tuple[float, float], p: float) -> float:
    """q = sigmoid(a + b (-log p)), clipped as TrojAI clips."""
    a, b = model
    q = 1 / (1 + math.exp(-(a + b * _feature(p))))
    return min(max(q, CLIP), 1 - CLIP)


def cross_entropy(q: list[float], backdoored: list[bool]) -> float:
    """Mean binary cross-entropy (nats) of probabilities q against the truth."""
    pairs = zip(q, backdoored, strict=True)
    return statistics.fmean(-math.log(qi if yi else 1 - qi) for qi, yi in pairs)


def calibration_zoo_fit(calibration: Calibration, truth: Truth, scans: dict[str, Any]
                        ) -> tuple[float, float]:
    """The probability map fitted on the calibration zoo: each clean model with its own
    leave-one-out p (the calibration's combined_null, in its clean_models order), each counted
    backdoor with its p against the calibration."""
    clean = calibration.provenance["clean_models"]
    ps = list(calibration.combined_null)
    bd = [n for n in scans if truth[n]["backdoored"] and truth[n]["counts"]]
    ps += [p_value(calibration, scans[n])[0] for n in bd]
    return fit_probability(ps, [False] * len(clean) + [True] * len(bd))


def _scores(truth: Truth, scans: dict[str, Any], calibration: Calibration
            ) -> dict[str, dict[str, Any]]:
    """Per model: new and before, each (ROC score, flagged, reported targets, detector)."""
    out = {}
    for name, rec in scans.items():
        p, fired, _ = p_value(calibration, rec)
        before = rec["before"]
        out[name] = {"new": (1 - p, p <= calibration.alpha, flagged_targets(calibration, rec),
                             fired),
                     "before": (before["margin"], before["status"] == "backdoored",
                                (before["target"],) if before["target"] is not None else (),
                                "mesa")}
    return out


def _row(label: str, bd: list[str], clean: list[str], truth: Truth,
         scores: dict[str, dict[str, Any]], which: str, q: dict[str, float] | None) -> str:
    """One family's line: models, ROC-AUC, cross-entropy, detected, right target, all targets.
    Right target: the first class reported is one of the truth's; all targets: every truth
    target is among the classes reported."""
    pos = [scores[n][which][0] for n in bd]
    neg = [scores[n][which][0] for n in clean]
    hits = [n for n in bd if scores[n][which][1]]
    first = sum(scores[n][which][2][0] in targets_of(truth[n]) for n in hits)
    every = sum(set(targets_of(truth[n])) <= set(scores[n][which][2]) for n in hits)
    lo, hi = wilson(len(hits), len(bd))
    ce = "-" if q is None else \
        f"{cross_entropy([q[n] for n in bd + clean], [True] * len(bd) + [False] * len(clean)):.3f}"
    shown = (f"{first}/{len(hits)} | {every}/{len(hits)}") if hits else "- | -"
    return (f"| {label} | {len(bd)} | {auc(pos, neg):.3f} | {ce} | {len(hits)}/{len(bd)} "
            f"({len(hits) / max(len(bd), 1):.0%}; {lo:.0%}-{hi:.0%}) | {shown} |")


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


def _family_table(which: str, title: str, truth: Truth, scores: dict[str, dict[str, Any]],
                  clean: list[str], bd: list[str], q: dict[str, float] | None) -> list[str]:
    false = [n for n in clean if scores[n][which][1]]
    lo, hi = wilson(len(false), len(clean))
    by_arch = {a: [n for n in clean if truth[n]["arch"] == a]
               for a in sorted({truth[n]["arch"] for n in clean})}
    lines = [f"## {title}", "",
             f"False alarms on the {len(clean)} clean test models: {len(false)} "
             f"({len(false) / max(len(clean), 1):.1%}; 95% interval {lo:.0%}-{hi:.0%})"
             + (f": {', '.join(false)}" if false else "") + "; by architecture: "
             + ", ".join(f"{a} {sum(n in false for n in ns)}/{len(ns)}"
                         for a, ns in by_arch.items()), "",
             "| family | backdoored models | ROC-AUC | cross-entropy | detected (TPR; 95% "
             "interval) | right target | all targets |", "|---|---|---|---|---|---|---|"]
    for label, keep in families(truth).items():
        members = [n for n in bd if keep(truth[n])]
        if members:
            lines.append(_row(label, members, clean, truth, scores, which, q))
    return lines + [""]


def _per_model(truth: Truth, scans: dict[str, Any], scores: dict[str, dict[str, Any]],
               q: dict[str, float]) -> list[str]:
    lines = ["## Per model", "",
             "| model | truth | ASR | scanner p | q | scanner verdict | before |",
             "|---|---|---|---|---|---|---|"]

    def verdict(s: tuple) -> str:
        return "backdoored " + ", ".join(map(str, s[2])) if s[1] else "clean"

    for n in scans:
        t = truth[n]
        what = f"target {t['target']}, {attack_text(t['attack'])}" if t["backdoored"] \
            else "clean"
        if t.get("also"):
            also = {("name" if k == "attack" else k): v for k, v in t["also"].items()
                    if k != "target"}
            what += f"; and target {t['also']['target']}, {attack_text(also)}"
        asr = "-" if t["asr"] is None else f"{t['asr']:.0%}"
        lines.append(f"| {n} | {what} | {asr} | {1 - scores[n]['new'][0]:.3f} | {q[n]:.3f} | "
                     f"{verdict(scores[n]['new'])} | {verdict(scores[n]['before'])} |")
    return lines


def markdown(truth: Truth, scans: dict[str, Any], calibration: Calibration,
             fitted: tuple[float, float], meta: dict[str, Any]) -> str:
    """The whole benchmark file; `fitted` is the calibration zoo's probability map, `meta` the
    scan run's command and machine."""
    # the zoo's models share input shape and class count: the architecture is what can differ
    covered = coverage_of(calibration).get("architectures")
    outside = {n: r for n, r in scans.items()
               if covered is not None and truth[n]["arch"] not in covered}
    scans = {n: r for n, r in scans.items() if n not in outside}
    scores = _scores(truth, scans, calibration)
    clean = [n for n in scans if not truth[n]["backdoored"]]
    bd = [n for n in scans if truth[n]["backdoored"] and truth[n]["counts"]]
    weak = [n for n in scans if truth[n]["backdoored"] and not truth[n]["counts"]]
    q = {n: probability(fitted, 1 - scores[n]["new"][0]) for n in scans}
    lines = ["# Scanner benchmark on the test zoo", "",
             f"- command: `{meta['command']}` (the `benchmark` stage of zoo/dvc.yaml), then "
             "`python -m tasks.zoo.detection_report` (its `detection_report` stage)",
             "- calibration: zoo/calibration.json (released as calibration/scanner.json), "
             "fitted on the calibration zoo's "
             f"{len(calibration.combined_null)} clean models only (alpha "
             f"{calibration.alpha}); the test zoo shares no base model with it and was scanned "
             "only here",
             f"- test zoo: {len(clean)} clean models, {len(bd)} backdoored models whose attack "
             f"succeeds (ASR >= 80%); left out: {', '.join(weak) or 'none'}; outside the "
             f"calibration (below): {', '.join(outside) or 'none'}",
             f"- cross-entropy: q = sigmoid({fitted[0]:.2f} + {fitted[1]:.2f} (-log p)), fitted "
             "on the calibration zoo (module docstring); each family's over its backdoors and "
             "every clean model",
             f"- machine: {meta['machine']}", ""]
    lines += _family_table("new", "Calibrated scanner (this release)", truth, scores, clean,
                           bd, q)
    fired: dict[str, int] = {}
    for n in bd:
        if scores[n]["new"][1]:
            fired[scores[n]["new"][3]] = fired.get(scores[n]["new"][3], 0) + 1
    lines += ["Detector that fired, over the detections: " + ", ".join(
        f"{d} {k}" for d, k in sorted(fired.items())), ""]
    lines += _family_table("before", "Detector before this release", truth, scores, clean, bd,
                           None)
    lines += _each_detector(truth, scans, calibration, clean, bd)
    new_s = [scans[n]["seconds"] for n in scans]
    old_s = [scans[n]["before"]["seconds"] for n in scans]
    lines += ["## Scan time per model", "",
              "Seconds of these scans, which may share the cores with other jobs: not a "
              "timing. The scan time targets are measured by benchmarks/scan_time.py with "
              "nothing else running.", "",
              "| scanner | median s | max s |", "|---|---|---|",
              f"| calibrated scanner | {statistics.median(new_s):.1f} | {max(new_s):.1f} |",
              f"| before | {statistics.median(old_s):.1f} | {max(old_s):.1f} |", ""]
    return "\n".join(lines + _outside(truth, outside, calibration)
                     + _per_model(truth, scans, scores, q)) + "\n"


def _outside(truth: Truth, outside: dict[str, Any], calibration: Calibration) -> list[str]:
    """The models the calibration does not cover: no verdict, their p-values for information."""
    if not outside:
        return []
    covered = coverage_of(calibration).get("architectures") or []
    lines = ["## Outside the calibration (verdict `uncalibrated`, not in the rates above)", "",
             f"Architectures the calibration's clean models cover: {', '.join(covered)}. The "
             "p-value below is what the null of those would say; the shipped scanner shows it "
             "and gives no verdict.",
             "", "| model | architecture | truth | scanner p |", "|---|---|---|---|"]
    for n, rec in outside.items():
        t = truth[n]
        what = f"target {t['target']}" if t["backdoored"] else "clean"
        lines.append(f"| {n} | {t['arch']} | {what} | {p_value(calibration, rec)[0]:.3f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    """Command line: write benchmarks/results/zoo_detection.md from the recorded scans."""
    argparse.ArgumentParser(prog="python -m tasks.zoo.detection_report").parse_args(argv)
    calibration = Calibration.from_dict(read_json(CALIBRATION), str(CALIBRATION))
    scans = read_json(SCANS / "test_zoo.json")
    cal_scans = read_json(SCANS / "calibration_zoo.json")
    truth = {n: read_json(truth_path("test", n)) for n in scans}
    cal_truth = {n: read_json(truth_path("calibration", n)) for n in cal_scans}
    meta = read_json(SCANS / "test_zoo_meta.json")
    calibration.check_settings(meta["settings"], str(CALIBRATION))  # scans it can judge
    fitted = calibration_zoo_fit(calibration, cal_truth, cal_scans)
    text = markdown(truth, scans, calibration, fitted, meta)
    RESULTS.write_text(text, encoding="utf-8")
    print(RESULTS)


if __name__ == "__main__":
    main()
