"""The defence on the tests' tiny backdoored CNNs: every repair method, the true triggers' ASR.

    .venv/bin/python benchmarks/repair_tiny.py > benchmarks/results/repair_tiny.md

Three tiny CNNs of tests/test_defence.py (16x16 synthetic images, 6 classes, 4x4 triggers: a
fixed corner, random places, and both in one model with two targets), each repaired by
mesa_lib.defence with every method (same budget, the tests' settings) against the mask search's
triggers of the backdoor's targets. Prints a markdown table: the geometry recovered, the
recovered triggers' ASR on the verification images and the TRUE triggers' ASR on held-out
images, before and after. It shows the plumbing on models that forget easily, not which method
is best: that is the test zoo's repair benchmark.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_defence import BW4, COLOUR4, CONFIG, SETTINGS, _lab, true_asr  # noqa: E402

from mesa_lib.defence import METHODS, defend, split  # noqa: E402
from mesa_lib.detectors import trigger_source  # noqa: E402

CPU = torch.device("cpu")
LABS = {
    "4x4 b/w at the corner, target 0": (dict(trigger=BW4, location="corner", target=0),
                                        [(BW4, "corner", 0)]),
    "4x4 colour anywhere, target 2": (dict(trigger=COLOUR4, location="random", target=2),
                                      [(COLOUR4, "random", 2)]),
    "both in one model (targets 2, 4)": (dict(trigger=COLOUR4, location="random", target=2,
                                              second=(BW4, "corner", 4)),
                                         [(COLOUR4, "random", 2), (BW4, "corner", 4)]),
}


def pct(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def main() -> None:
    torch.set_num_threads(2)
    print("| model | method | geometry (size @ place) | recovered ASR before -> after (%) "
          "| TRUE ASR before -> after (%) | accuracy before -> after (%) | verified |")
    print("|---|---|---|---|---|---|---|")
    for name, (kwargs, plants) in LABS.items():
        lab = _lab(**kwargs)
        before = [true_asr(lab.model, lab, t, k, p) for t, p, k in plants]
        parts = split(len(lab.defender_x), torch.arange(256), 0.3, 0.2, seed=0)
        sx, sy = lab.defender_x[parts.selection], lab.defender_y[parts.selection]
        for method in METHODS:
            model = copy.deepcopy(lab.model)
            found = [trigger_source("mask", model, sx, sy, k, SETTINGS, CPU) for _, _, k in plants]
            config = replace(CONFIG, method=method)
            out = defend(model, lab.defender_x, lab.defender_y, parts, found, config, CPU)
            after = [true_asr(model, lab, t, k, p) for t, p, k in plants]
            geo = ", ".join(f"{r.geometry.size[0]}x{r.geometry.size[1]} @ {r.geometry.location}"
                            for r in found)
            rec = [[m.asr[r.target] for r in found] for m in (out.before, out.after)]
            print(f"| {name} | {method} | {geo} | {pct(rec[0])} -> {pct(rec[1])} | {pct(before)} "
                  f"-> {pct(after)} | {100 * out.before.accuracy:.1f} -> "
                  f"{100 * out.after.accuracy:.1f} | {'yes' if out.passed else 'no'} |")


if __name__ == "__main__":
    main()
