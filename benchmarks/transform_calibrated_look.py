"""The transform detector alone, calibrated on the calibration zoo's clean models (each class
against the same class in clean models, mesa_lib.calibration), on its whole-image backdoors:
p-values and targets, and the clean models' leave-one-out false alarms. Calibration zoo only.

    python benchmarks/transform_calibrated_look.py --grid 16 --steps 150
"""

from __future__ import annotations

import argparse
import time

import torch

from mesa_lib import calibration as cal
from mesa_lib.detectors import ScanSettings, run_detectors
from mesa_lib.modelio import load_model
from mesa_lib.transformsearch import TransformSearchConfig
from tasks.common.io import read_json
from tasks.common.params import load_params
from tasks.scan.reference import Reference, reference_batch
from tasks.zoo.build import load_data, stem_of, truth_path
from tasks.zoo.params import load_zoo_params

WHOLE_IMAGE = ("sig", "wanet", "colour_filter", "low_frequency")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params, zoo = load_params("params.yaml"), load_zoo_params()
    data = load_data(zoo)
    ref = Reference(data.reference.images, data.reference.labels, data.reference.classes, "zoo")
    x, y = reference_batch(ref, params.scan.images, params.base.seed)
    settings = ScanSettings({"transform": TransformSearchConfig(grid=args.grid,
                                                                steps=args.steps)},
                            images=params.scan.images, seed=params.base.seed)
    names = zoo.names("calibration")
    truth = {n: read_json(truth_path("calibration", n)) for n in names}
    clean = [n for n in names if not truth[n]["backdoored"]]
    whole = [n for n in names if truth[n]["backdoored"]
             and truth[n]["attack"]["name"] in WHOLE_IMAGE]
    scores = {}
    for name in clean + whole:
        model, _ = load_model(stem_of(zoo, name), map_location="cpu")
        start = time.perf_counter()
        scores[name] = run_detectors(model, x, y, 10, settings, torch.device("cpu"))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    stats = [{d: s.scores for d, s in scores[n].items()} for n in clean]
    fitted = cal.fit(stats, params.scan.alpha, params.scan.floor, settings.fingerprint(), {})
    alarms = sum(p <= params.scan.alpha for p in fitted.combined_null)
    print(f"\nclean models: {len(clean)}; flagged leave-one-out at alpha {params.scan.alpha}: "
          f"{alarms}")
    print("| model | attack | ASR | target | p | flagged targets |")
    print("|---|---|---|---|---|---|")
    for name in whole:
        v = cal.decide(scores[name], fitted)
        t = truth[name]
        print(f"| {name} | {t['attack']['name']} | {t['asr']:.1%} | {t['target']} | "
              f"{v.p_value:.3f} | {list(v.targets)} |")


if __name__ == "__main__":
    main()
