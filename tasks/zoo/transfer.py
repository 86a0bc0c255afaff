"""How far a calibration carries to an architecture it never saw: leave one architecture out.

    python -m tasks.zoo.transfer    # zoo/scans/*.json -> benchmarks/results/zoo_transfer.md

For each architecture A of the zoo, the scanner's clean null is refitted (mesa_lib.calibration.
fit, with the released calibration's alpha, floor and settings) on the calibration zoo's clean
models of every OTHER architecture, and every model of A, from both zoos, is judged against it:
its clean models give the false-alarm rate on an unseen architecture, its working backdoors the
hit rate. The same test-zoo models judged by the released calibration (which saw A) are shown
beside it. Nothing is scanned again: the class scores are the recorded scans of `calibrate` and
`benchmark` (zoo/scans/), measured with the released settings. When the other architectures
hold too few clean models for the null to ever flag (fit's (n + 1) * alpha < 1), the row says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mesa_lib import calibration as cal
from tasks.common.io import read_json
from tasks.zoo.build import truth_path
from tasks.zoo.report import Truth, class_scores, p_value, targets_of, wilson

SCANS = {"calibration": Path("zoo/scans/calibration_zoo.json"),
         "test": Path("zoo/scans/test_zoo.json")}
RELEASED = Path("zoo/calibration.json")
RESULTS = Path("benchmarks/results/zoo_transfer.md")


def refit(released: cal.Calibration, scans: dict[str, Any], clean: list[str]) -> cal.Calibration:
    """The released calibration's null refitted on `clean` models' recorded class scores.

    Raises:
        ValueError: too few models for a p-value <= alpha (mesa_lib.calibration.fit).
    """
    stats = [{d: s for d, s in class_scores(scans[n]).items() if d in released.detectors}
             for n in clean]
    return cal.fit(stats, released.alpha, released.floor, released.settings,
                   {"clean_models": clean})


def judge(calibration: cal.Calibration, scans: dict[str, Any], truth: Truth,
          names: list[str]) -> dict[str, Any]:
    """False alarms among the clean `names`, hits (and right targets) among the working
    backdoors."""
    flagged = {n: p_value(calibration, scans[n]) for n in names}
    clean = [n for n in names if not truth[n]["backdoored"]]
    bd = [n for n in names if truth[n]["backdoored"] and truth[n]["counts"]]
    hits = [n for n in bd if flagged[n][0] <= calibration.alpha]
    return {"clean": clean, "false": [n for n in clean if flagged[n][0] <= calibration.alpha],
            "backdoors": bd, "hits": hits,
            "right": [n for n in hits if flagged[n][2] in targets_of(truth[n])]}


def _share(part: list[str], whole: list[str]) -> str:
    lo, hi = wilson(len(part), len(whole))
    return f"{len(part)}/{len(whole)} ({lo:.0%}-{hi:.0%})"


def _row(label: str, fitted_on: str, r: dict[str, Any]) -> str:
    false = f"{_share(r['false'], r['clean'])}" + (f": {', '.join(r['false'])}"
                                                   if r["false"] else "")
    return (f"| {label} | {fitted_on} | {false} | {_share(r['hits'], r['backdoors'])} | "
            f"{len(r['right'])}/{len(r['hits'])} |")


def markdown(released: cal.Calibration, scans: dict[str, Any], truth: Truth,
             command: str) -> str:
    """The whole report: per architecture, left out against the released calibration."""
    zoo_of = {n: truth[n]["zoo"] for n in scans}
    archs = sorted({truth[n]["arch"] for n in scans})
    lines = ["# Leave one architecture out: the scanner on an architecture it was not "
             "calibrated on", "", f"- command: `{command}`",
             f"- class scores: the recorded zoo scans ({', '.join(map(str, SCANS.values()))}), "
             f"settings of {RELEASED}; alpha {released.alpha}",
             "- false alarms and hits with 95% Wilson intervals; 'right target': a flagged "
             "model whose suspected class is its (a) target", "",
             "| architecture judged | null fitted on (clean calibration models) | false alarms "
             "| backdoors detected | right target |", "|---|---|---|---|---|"]
    for arch in archs:
        others = [n for n in scans if zoo_of[n] == "calibration" and not truth[n]["backdoored"]
                  and truth[n]["arch"] != arch]
        mine = [n for n in scans if truth[n]["arch"] == arch]
        fitted_on = f"{len(others)} of {', '.join(sorted({truth[n]['arch'] for n in others}))}"
        try:
            left_out = refit(released, scans, others)
        except ValueError as err:
            lines.append(f"| {arch}, both zoos ({len(mine)} models) | {fitted_on} | "
                         f"no verdict possible: {err} | - | - |")
            continue
        lines.append(_row(f"{arch}, both zoos, left out", fitted_on, judge(
            left_out, scans, truth, mine)))
        tested = [n for n in mine if zoo_of[n] == "test"]
        lines.append(_row(f"{arch}, test zoo, left out", fitted_on, judge(
            left_out, scans, truth, tested)))
        lines.append(_row(f"{arch}, test zoo, released calibration",
                          f"{len(released.combined_null)} of every architecture",
                          judge(released, scans, truth, tested)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: write the report."""
    ap = argparse.ArgumentParser(prog="python -m tasks.zoo.transfer")
    ap.parse_args(argv)
    scans = {n: r for path in SCANS.values() for n, r in read_json(path).items()}
    truth = {n: read_json(truth_path(z, n)) for z, path in SCANS.items()
             for n in read_json(path)}
    released = cal.Calibration.from_dict(read_json(RELEASED), str(RELEASED))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown(released, scans, truth, "python -m tasks.zoo.transfer"),
                       encoding="utf-8")
    print(RESULTS)


if __name__ == "__main__":
    main()
