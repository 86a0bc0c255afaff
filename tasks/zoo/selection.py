"""Which detectors and floor the scanner uses, chosen on the calibration zoo only.

    python -m tasks.zoo.selection zoo/scans/calibration_zoo_mask_mesa.json

Reads a calibration-zoo scan that ran every candidate detector (`calibrate` with both `mask`
and `mesa` in `scan.detectors`, kept as zoo/scans/calibration_zoo_mask_mesa.json) and, for each
set of the detectors it ran and each floor, fits the calibration on the clean models and counts
the clean models flagged leave-one-out and the working backdoors flagged at alpha. Writes
benchmarks/results/zoo_selection.md. The test zoo is never read.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from mesa_lib import calibration as cal
from tasks.common.io import read_json
from tasks.zoo.build import truth_path

RESULTS = Path("benchmarks/results/zoo_selection.md")
FLOORS = (0.05, 0.1, 0.2, 0.3)
ALPHA = 0.05


def candidates(scans: dict) -> list[tuple[str, ...]]:
    """Every non-empty set of the detectors the scan ran, singles first, in the scan's order."""
    ran = list(next(iter(scans.values()))["detectors"])
    return [c for k in range(1, len(ran) + 1) for c in itertools.combinations(ran, k)]


def _scores(record: dict, detectors: tuple[str, ...]) -> dict[str, dict[int, float]]:
    return {d: {int(c): v for c, v in record["detectors"][d]["scores"].items()}
            for d in detectors}


def evaluate(scans: dict, truth: dict, detectors: tuple[str, ...], floor: float
             ) -> tuple[int, int, int, int, int]:
    """(clean flagged LOO, clean models, backdoors flagged, right targets, working backdoors)."""
    clean = [n for n in scans if not truth[n]["backdoored"]]
    working = [n for n in scans if truth[n]["backdoored"] and truth[n]["counts"]]
    fitted = cal.fit([_scores(scans[n], detectors) for n in clean], ALPHA, floor, {}, {})
    false_alarms = sum(p <= ALPHA for p in fitted.combined_null)
    hits = right = 0
    for name in working:
        stats = {d: fitted.statistic(d, s) for d, s in _scores(scans[name], detectors).items()}
        p, fired = fitted.combined({d: s[0] for d, s in stats.items()})
        if p <= ALPHA:
            hits += 1
            right += stats[fired][1] == truth[name]["target"]
    return false_alarms, len(clean), hits, right, len(working)


def markdown(source: Path) -> str:
    """The table of every candidate on the calibration zoo scan `source`."""
    scans = read_json(source)
    truth = {n: read_json(truth_path("calibration", n)) for n in scans}
    rows = ["| detectors | floor | clean flagged (leave-one-out) | working backdoors flagged | "
            "right target |", "|---|---|---|---|---|"]
    for detectors in candidates(scans):
        for floor in FLOORS:
            fa, n_clean, hits, right, n_bd = evaluate(scans, truth, detectors, floor)
            rows.append(f"| {' + '.join(detectors)} | {floor} | {fa}/{n_clean} | {hits}/{n_bd} "
                        f"| {right}/{hits} |")
    return (f"# Scanner selection on the calibration zoo\n\n"
            f"`python -m tasks.zoo.selection {source}` (alpha {ALPHA}; the test zoo is not "
            f"read).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: the scan file of the calibration zoo."""
    ap = argparse.ArgumentParser(prog="python -m tasks.zoo.selection")
    ap.add_argument("scans", type=Path)
    args = ap.parse_args(argv)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown(args.scans), encoding="utf-8")
    print(RESULTS)


if __name__ == "__main__":
    main()
