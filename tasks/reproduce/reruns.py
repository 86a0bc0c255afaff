"""Cells run again with unchanged settings, against their earlier records (issue 26).

The 10-seed grid reruns the 24 tuned, 8 paper and 4 selection cells of 2026-11-30/12-01 with the
same settings, because the cell code now also measures new rows. Those earlier records were made
on a machine with another CPU (float kernels differ), so the reruns are compared, not assumed
equal: reproduce/results/earlier/<profile>/ holds a copy of them (taken from git before the grid
overwrote them), and the report lists, per method both hold, how far the rerun moved the ASR and
the clean accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tasks.common.io import read_json
from tasks.reproduce.paths import RESULTS

EARLIER = RESULTS / "earlier"


def earlier(profile: str) -> dict[tuple[int, int], dict[str, Any]]:
    """(seed, pattern) -> the earlier record of that cell."""
    out = {}
    for path in sorted(Path(EARLIER / profile).glob("s*-p*.json")):
        rec = read_json(path)
        out[(rec["seed"], rec["pattern"])] = rec
    return out


def table(profile: str, cells: list[dict[str, Any]]) -> list[str]:
    """Per method held by both: cells compared, mean and largest change of ASR and accuracy
    (points); [] when no rerun cell has an earlier record."""
    before = earlier(profile)
    moved: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    compared, unlike = 0, []
    for cell in cells:
        old = before.get((cell["seed"], cell["pattern"]))
        if old is None:
            continue
        if any(old.get(k) != cell.get(k) for k in ("ran_with", "settings", "repair")):
            unlike.append(f"s{cell['seed']}-p{cell['pattern']}")  # other settings: not a rerun
            continue
        compared += 1
        for method, now in cell["evaluation"].items():
            then = old["evaluation"].get(method)
            if then is None:
                continue
            for key in ("asr", "clean_acc"):
                moved[method][key].append(100 * (now[key] - then[key]))
    note = ([f"Not compared, run with other settings than their earlier records (the "
             f"selection may have chosen otherwise): {', '.join(unlike)}.", ""] if unlike else [])
    if not compared:
        return note
    rows = [*note, f"Cells run again against their earlier records ({compared} cells; the "
            "earlier ones ran on another CPU; points, rerun minus earlier):", "",
            "| model | ASR: mean change | ASR: largest change | accuracy: mean change | "
            "accuracy: largest change |", "|---|---|---|---|---|"]
    for method, keys in moved.items():
        a, c = keys["asr"], keys["clean_acc"]
        rows.append(f"| {method} | {sum(a) / len(a):+.2f} | {max(a, key=abs):+.2f} | "
                    f"{sum(c) / len(c):+.2f} | {max(c, key=abs):+.2f} |")
    return rows
