"""A/B of the blend geometry's spread crops (mesa_lib.geometry), on calibration-zoo backdoors.

    python benchmarks/blend_spread.py cal-inj-06 cal-inj-08           # the shipped placer
    python benchmarks/blend_spread.py --without cal-inj-06 cal-inj-08 # blends through the mask only

Each model is scanned and repaired by MESA at the demo's budget (2 epochs, lr 0.01, rate 0.5)
exactly as the repair benchmark does (tasks.zoo.repair.measure_model); printed: the true
trigger's ASR before, after, and on clean models, the accuracy, the verification and the
geometry. Calibration zoo only: this chose a design, the test zoo reports it.
"""

from __future__ import annotations

import argparse

import torch

import mesa_lib.geometry as geometry
from tasks.common.params import load_params
from tasks.zoo.build import load_data
from tasks.zoo.params import load_zoo_params
from tasks.zoo.repair import GRID, measure_model


def _blend_only(images, triggers, geo, generator):
    m = geo.mask.to(images.device)
    return (1 - m) * images + m * triggers.to(images.device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--without", action="store_true", help="no spread crops (the old placer)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.without:
        geometry.PLACERS["blend"] = _blend_only
    params, zoo = load_params("params.yaml"), load_zoo_params()
    data = load_data(zoo)
    for name in args.models:
        r = measure_model(name, zoo, data, params, [GRID[0]], ("mesa",), torch.device("cpu"))
        for row in r["repairs"]:
            geo = row["outcome"]["targets"][0]["geometry"]
            print(f"{name} {'without' if args.without else 'with'} spread crops: true ASR "
                  f"{r['truth']['asr']:.3f} -> {row['asr']:.3f} (clean models {r['clean_asr']:.3f}"
                  f"), accuracy {r['truth']['clean_accuracy']:.3f} -> {row['accuracy']:.3f}, "
                  f"verification {row['outcome']['verdict']}, geometry {geo['kind']} "
                  f"core {geo.get('core')}", flush=True)


if __name__ == "__main__":
    main()
