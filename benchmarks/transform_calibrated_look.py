"""The transform detector, calibrated on the calibration zoo's clean models (each class against
the same class in clean models, mesa_lib.calibration): p-values and targets of the calibration
zoo's backdoors, and the clean models' leave-one-out false alarms; alone, and with `--joint
zoo/scans/calibration_zoo.json` (the `calibrate` stage's mask scans) beside the mask search
alone and the two calibrated together. Calibration zoo only: a selection-side look.

    python benchmarks/transform_calibrated_look.py --grid 16 --steps 150
    python benchmarks/transform_calibrated_look.py --grid 16 --steps 75 --batch-size 4 \
        --cache zoo/scans/transform_look --joint zoo/scans/calibration_zoo.json

Each model's transform scan is kept in --cache (one JSON per model, keyed by the settings), so
an interrupted run resumes. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mesa_lib import calibration as cal
from mesa_lib.detectors import ScanSettings, run_detectors
from mesa_lib.modelio import load_model
from mesa_lib.transformsearch import TransformSearchConfig
from tasks.common.io import read_json, write_json
from tasks.common.params import load_params
from tasks.scan.reference import Reference, reference_batch
from tasks.zoo.build import load_data, stem_of, truth_path
from tasks.zoo.params import load_zoo_params
from tasks.zoo.report import class_scores, flagged_targets, p_value

WHOLE_IMAGE = ("sig", "wanet", "colour_filter", "low_frequency")


def _record(scores: dict, seconds: float) -> dict[str, Any]:
    """A scan record as tasks.zoo.scan writes one (the parts the reports read)."""
    return {"seconds": seconds, "detectors": {
        d: {"scores": {str(c): v for c, v in s.scores.items()},
            "per_class": {str(c): v for c, v in s.per_class.items()}}
        for d, s in scores.items()}}


def transform_scans(names: list[str], settings: ScanSettings, cache: Path | None,
                    reverse: bool = False) -> dict[str, dict[str, Any]]:
    """Each model's transform scan record, from the cache when made with these settings
    (`reverse`: last model first, for a helper on the other core)."""
    params, zoo = load_params("params.yaml"), load_zoo_params()
    data = load_data(zoo)
    ref = Reference(data.reference.images, data.reference.labels, data.reference.classes, "zoo")
    x, y = reference_batch(ref, params.scan.images, params.base.seed)
    key = json.dumps(settings.fingerprint(), sort_keys=True)
    out = {}
    for name in reversed(names) if reverse else names:
        path = cache / f"{name}.json" if cache else None
        if path and path.exists() and read_json(path).get("key") == key:
            out[name] = read_json(path)
            continue
        model, _ = load_model(stem_of(zoo, name), map_location="cpu")
        start = time.perf_counter()
        scores = run_detectors(model, x, y, 10, settings, torch.device("cpu"))
        out[name] = _record(scores, time.perf_counter() - start) | {"key": key}
        print(f"{name}: {out[name]['seconds']:.0f} s", flush=True)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, out[name])
    return {name: out[name] for name in names}


def table(title: str, scans: dict[str, dict[str, Any]], truth: dict[str, dict[str, Any]],
          clean: list[str], backdoors: list[str], fingerprint: dict[str, Any],
          alpha: float, floor: float) -> list[str]:
    """The calibration fitted on `clean`'s scans; its leave-one-out false alarms and each
    backdoor's p-value and flagged targets."""
    fitted = cal.fit([class_scores(scans[n]) for n in clean], alpha, floor, fingerprint, {})
    alarms = sum(p <= alpha for p in fitted.combined_null)
    hit = [n for n in backdoors if p_value(fitted, scans[n])[0] <= alpha]
    right = [n for n in hit if set(truth[n]["targets"]) <= set(flagged_targets(fitted,
                                                                               scans[n]))]
    lines = [f"### {title}", "",
             f"clean models: {len(clean)}, flagged leave-one-out at alpha {alpha}: {alarms}; "
             f"working backdoors flagged: {len(hit)} of {len(backdoors)}, with every target: "
             f"{len(right)}", "",
             "| model | attack | ASR | targets | p | flagged targets |",
             "|---|---|---|---|---|---|"]
    for name in backdoors:
        t = truth[name]
        lines.append(f"| {name} | {t['attack']['name']} | {t['asr']:.1%} | {t['targets']} | "
                     f"{p_value(fitted, scans[name])[0]:.3f} | "
                     f"{list(flagged_targets(fitted, scans[name]))} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--reverse", action="store_true", help="last model first (a helper)")
    ap.add_argument("--joint", type=Path, default=None,
                    help="the calibrate stage's scans (mask search) of the same models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params, zoo = load_params("params.yaml"), load_zoo_params()
    config = TransformSearchConfig(grid=args.grid, steps=args.steps,
                                   batch_size=args.batch_size)
    settings = ScanSettings({"transform": config}, images=params.scan.images,
                            seed=params.base.seed)
    names = zoo.names("calibration")
    truth = {n: read_json(truth_path("calibration", n)) for n in names}
    clean = [n for n in names if not truth[n]["backdoored"]]
    working = [n for n in names if truth[n]["backdoored"] and truth[n]["counts"]]
    if args.joint is None:  # the first look: the whole-image backdoors only
        working = [n for n in working if truth[n]["attack"]["name"] in WHOLE_IMAGE]
    scans = transform_scans(clean + working, settings, args.cache, args.reverse)
    fp, a, f = settings.fingerprint(), params.scan.alpha, params.scan.floor
    lines = table("transform alone", scans, truth, clean, working, fp, a, f)
    if args.joint is not None:
        masks = read_json(args.joint)
        joint = {n: {**masks[n], "detectors": {**masks[n]["detectors"],
                                               **scans[n]["detectors"]}}
                 for n in clean + working}
        both = {"detectors": {"mask": {}, **fp["detectors"]}}
        lines += table("mask alone (the calibrate stage's scans)", masks, truth, clean, working,
                       {"detectors": {"mask": {}}}, a, f)
        lines += table("mask and transform, calibrated together", joint, truth, clean, working,
                       both, a, f)
    secs = sorted(s["seconds"] for s in scans.values())
    lines.append(f"transform seconds per model (one thread, not a timing): median "
                 f"{secs[len(secs) // 2]:.0f}, max {secs[-1]:.0f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
