"""First look at the transform detector on CIFAR-10 (calibration zoo only): each class's
smallest whole-image transformation on clean models and on whole-image backdoors, and where
the backdoor's target ranks among its model's classes and against the same class in the clean
models of the same base.

    python benchmarks/transform_first_look.py --grid 16 --steps 150 MODEL...

Prints one line per model: seconds, the target's rank (0 = the smallest size), its log-size
score (median class minus the class, as the detector scores it) and every class's size.
"""

from __future__ import annotations

import argparse
import time

import torch

from mesa_lib.modelio import load_model
from mesa_lib.transformsearch import FAMILIES, TransformSearchConfig, transform_search
from tasks.scan.reference import Reference, reference_batch
from tasks.zoo.build import load_data, stem_of
from tasks.zoo.params import load_zoo_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = load_zoo_params()
    data = load_data(zoo)
    ref = Reference(data.reference.images, data.reference.labels, data.reference.classes, "zoo")
    x, _ = reference_batch(ref, 256, 0)
    config = TransformSearchConfig(grid=args.grid, steps=args.steps,
                                   families=tuple(args.families.split(",")))
    for name in args.models:
        kind, entry = zoo.entry(name)
        assert entry.zoo == "calibration", "calibration zoo only: the test zoo reports"
        model, _ = load_model(stem_of(zoo, name), map_location="cpu")
        start = time.perf_counter()
        found = transform_search(model, x, tuple(range(10)), config, torch.device("cpu"))
        seconds = time.perf_counter() - start
        log = found.size.clamp_min(1e-4).log()
        score = log.median() - log
        target = entry.target if kind == "backdoors" else None
        rank = None if target is None else int((found.size < found.size[target]).sum())
        others = score if target is None else torch.cat([score[:target], score[target + 1:]])
        mine = "-" if target is None else f"{float(score[target]):.2f}"
        print(f"{name} attack={getattr(entry, 'attack', 'clean')} target={target} rank={rank} "
              f"score={mine} max_other={float(others.max()):.2f} {seconds:.0f}s "
              f"sizes={[round(float(v), 3) for v in found.size]} "
              f"families={list(found.family)}", flush=True)


if __name__ == "__main__":
    main()
