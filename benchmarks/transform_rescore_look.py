"""The transform detector's class scores recomputed from the cached scans of the calibration
zoo (no new search): how much of its weakness is a scoring artifact. Calibration zoo only: a
selection-side look (issue 24).

    python benchmarks/transform_rescore_look.py zoo/scans/models/transform-look \
        --joint zoo/scans/calibration_zoo.json

The cache is what `benchmarks/transform_calibrated_look.py --grid 16 --steps 50 --batch-size 4
--cache ...` wrote (transform_budget_look.md). Each rescoring keeps the search's sizes and
changes only how a class's size enters the score:
- as is (the detector's own score: the model's median log size minus the class's log size);
- a size whose transformation sends fewer than `asr` of all the reference images to the class
  (its success measured on all of them after the search) is replaced by the model's median
  size (neither suspicious nor clearing), for asr 0.3 and 0.5;
- a size below asr 0.5 capped at 1 (the size of a class nothing reached);
- the size divided by that success.
The search counts a step as a success when its batch (4 images at this setting) all go to the
class, and its batches are the same for every model (one seed), so a batch of images many
models already call one class makes a tiny "successful" size there.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from transform_calibrated_look import table

from mesa_lib.detectors import ScanSettings
from mesa_lib.transformsearch import TransformSearchConfig
from tasks.common.io import read_json
from tasks.common.params import load_params
from tasks.zoo.build import truth_path
from tasks.zoo.params import load_zoo_params

Effective = Callable[[dict], float | None]  # a class's per_class record -> its size (None: median)


def rescored(per_class: dict[str, dict], effective: Effective) -> dict[str, float]:
    """Class scores (median log size - log size) of one scan under a rescoring."""
    sizes = {c: effective(v) for c, v in per_class.items()}
    known = sorted(s for s in sizes.values() if s is not None)
    median = known[len(known) // 2] if known else 1.0
    sizes = {c: max(median if s is None else s, 1e-4) for c, s in sizes.items()}
    logs = sorted(math.log(s) for s in sizes.values())
    mid = (logs[(len(logs) - 1) // 2] + logs[len(logs) // 2]) / 2
    return {c: mid - math.log(s) for c, s in sizes.items()}


def _neutral_below(asr: float) -> Effective:
    return lambda v: v["transform_size"] if v["transform_asr"] >= asr else None


RESCORINGS: dict[str, Effective] = {
    "as is": lambda v: v["transform_size"],
    "median below asr 0.3": _neutral_below(0.3),
    "median below asr 0.5": _neutral_below(0.5),
    "capped below asr 0.5": lambda v: v["transform_size"] if v["transform_asr"] >= 0.5 else 1.0,
    "size / asr": lambda v: v["transform_size"] / max(v["transform_asr"], 0.01),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", type=Path)
    ap.add_argument("--joint", type=Path, required=True,
                    help="the calibrate stage's scans (mask search) of the same models")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    params, zoo = load_params("params.yaml"), load_zoo_params()
    names = zoo.names("calibration")
    truth = {n: read_json(truth_path("calibration", n)) for n in names}
    clean = [n for n in names if not truth[n]["backdoored"]]
    working = [n for n in names if truth[n]["backdoored"] and truth[n]["counts"]]
    per_class = {n: read_json(args.cache / f"{n}.json")["detectors"]["transform"]["per_class"]
                 for n in clean + working}
    masks = read_json(args.joint)
    config = TransformSearchConfig(grid=args.grid, steps=args.steps, batch_size=args.batch_size)
    fp = ScanSettings({"transform": config}, images=params.scan.images,
                      seed=params.base.seed).fingerprint()
    both = {"detectors": {"mask": {}, **fp["detectors"]}}
    a, f = params.scan.alpha, params.scan.floor
    print("| rescoring | transform alone | with the mask search, calibrated together |")
    print("|---|---|---|")
    details = []
    for title, effective in RESCORINGS.items():
        scans = {n: {"detectors": {"transform": {"scores": rescored(pc, effective),
                                                 "per_class": {}}}}
                 for n, pc in per_class.items()}
        joint = {n: {**masks[n], "detectors": {**masks[n]["detectors"], **scans[n]["detectors"]}}
                 for n in scans}
        alone = table(f"{title}: transform alone", scans, truth, clean, working, fp, a, f)
        with_mask = table(f"{title}: with the mask search", joint, truth, clean, working, both,
                          a, f)
        print(f"| {title} | {alone[2]} | {with_mask[2]} |")
        details += alone + with_mask
    print("\n" + "\n".join(details))


if __name__ == "__main__":
    main()
