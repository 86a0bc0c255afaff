"""Scanning the zoo: calibrate the scanner on the calibration zoo, measure it on the test zoo.

    python -m tasks.zoo.scan calibrate    # calibration zoo -> zoo/calibration.json
    python -m tasks.zoo.scan benchmark    # test zoo -> zoo/scans/test_zoo.json (+ _meta.json)

Both scan with params.yaml's `scan.*` settings on the zoo's reference images (the scanner never
sees the images the truth records were measured on). `calibrate` fits the clean-model null
(mesa_lib.calibration) on the calibration zoo's clean models only and records, for information,
how the calibration zoo's backdoored models score. `benchmark` never fits anything: it scans the
test zoo with the calibrated settings, and with the detector of the previous release ("before":
fixed MAD thresholds, MESA only, random places); tasks.zoo.detection_report judges the scans
against the calibration file and writes the table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mesa_lib import calibration as cal
from mesa_lib.detect import DetectConfig, detect
from mesa_lib.detectors import run_detectors
from mesa_lib.mesa import MesaConfig
from mesa_lib.modelio import load_manifest, load_model, model_fingerprint
from mesa_lib.seed import resolve_device
from tasks.common.configs import scan_settings
from tasks.common.io import read_json, write_json
from tasks.common.params import Params, load_params
from tasks.dev.codedeps import closure
from tasks.scan.reference import Reference, reference_batch
from tasks.zoo.build import load_data, stem_of, truth_path
from tasks.zoo.params import ZooParams, load_zoo_params
from tasks.zoo.report import class_scores, p_value

SCANS = Path("zoo/scans")
# One record per model, keyed by the code, the settings and the model's files: an interrupted
# `calibrate` or `benchmark` (an hour of CPU for the test zoo) resumes, and a second process
# started with --reverse on the other core shares the work (git-ignored; the stage's outputs
# are the files above it)
MODEL_SCANS = SCANS / "models"
# The zoo's calibration. The scanner ships a released copy, calibration/scanner.json (params.yaml
# scan.calibration; tests/test_zoo.py checks the two agree): a copy, not this stage's output, so
# the demo pipeline, whose `evaluate` reads it, never pulls the hours-long zoo into `dvc repro`.
CALIBRATION = Path("zoo/calibration.json")
# The detector before this release: MESA on 3x3 random-place triggers, flagged when a class's
# ASR was a MAD outlier (index > 2.0) reaching min_asr 0.5 (params.yaml at commit 997402b).
BEFORE = DetectConfig(mesa=MesaConfig(betas=(0.8,), epochs=1, batch_size=32, lr=0.002),
                      eval_images=200, anomaly_threshold=2.0, min_asr=0.5)
BEFORE_IMAGES = 600


def _scan_model(stem: Path, images: torch.Tensor, labels: torch.Tensor, params: Params,
                device: torch.device, before: bool) -> dict[str, Any]:
    """One zoo model through the scanner's detectors on the images the shipped scanner draws
    from this reference (tasks.scan.reference.reference_batch: `mesa-scan`, the service and the
    pipeline draw the same), and through the old detector when asked."""
    model, manifest = load_model(stem, map_location=device)
    settings = scan_settings(params)
    ref = Reference(images, labels, tuple(str(k) for k in range(manifest.num_classes)), "zoo")
    x, y = reference_batch(ref, params.scan.images, params.base.seed)
    start = time.perf_counter()
    scores = run_detectors(model, x, y, manifest.num_classes, settings, device)
    out: dict[str, Any] = {
        "name": stem.name, "sha256": model_fingerprint(stem),
        "seconds": time.perf_counter() - start,
        "detectors": {d: {"scores": {str(c): v for c, v in s.scores.items()},
                          "seconds": s.seconds,
                          "per_class": {str(c): v for c, v in s.per_class.items()}}
                      for d, s in scores.items()}}
    if before:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(2))
        sub = pick[:BEFORE_IMAGES].sort().values
        start = time.perf_counter()
        v = detect(model, images[sub], (images.shape[1], 3, 3),
                   replace(BEFORE, seed=params.base.seed), device,
                   labels[sub])
        margin = max(s["margin"] for s in v.per_class["mesa"].values())
        out["before"] = {"status": v.status, "target": v.target, "margin": margin,
                         "seconds": time.perf_counter() - start}
    return out


def scan_key(params: Params, zoo: ZooParams, before: bool) -> str:
    """A hash of this command's source files and of everything a scan record depends on but
    the model (whose sha256 each record holds)."""
    h = hashlib.sha256()
    for path in sorted(closure("tasks.zoo.scan", Path("."))):
        h.update(path.read_bytes())
    h.update(repr((scan_settings(params).fingerprint(), params.scan.images, params.base.seed,
                   params.base.device, zoo.data.model_dump(), before)).encode())
    return h.hexdigest()[:16]


def scan_zoo(names: list[str], params: Params, zoo: ZooParams, before: bool = False,
             log: bool = True, reverse: bool = False) -> dict[str, dict[str, Any]]:
    """Scan zoo models by name on the zoo's reference images; one record each, in `names`'
    order, taken from MODEL_SCANS where one was made with the same key and model files
    (`reverse`: last model first, for a helper process on the other core)."""
    device = resolve_device(params.base.device)
    data = load_data(zoo)
    key = scan_key(params, zoo, before)
    out = {}
    for name in reversed(names) if reverse else names:
        stem, path = stem_of(zoo, name), MODEL_SCANS / f"{name}.json"
        kept = read_json(path) if path.is_file() else {}
        if kept.get("key") == key and kept.get("sha256") == model_fingerprint(stem):
            out[name] = {k: v for k, v in kept.items() if k != "key"}
            continue
        out[name] = _scan_model(stem, data.reference.images, data.reference.labels, params,
                                device, before)
        write_json(path, {"key": key, **out[name]})
        if log:
            print(f"{time.strftime('%H:%M:%S')} {name} ({out[name]['seconds']:.1f} s)",
                  flush=True)
    return {name: out[name] for name in names}


def _git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def coverage(stems: list[Path], dataset: str) -> dict[str, Any]:
    """What the clean models a calibration is fitted on are: a model outside this is judged
    against a null it is not part of (tasks.scan.coverage refuses a verdict on it)."""
    manifests = [load_manifest(s) for s in stems]
    return {"architectures": sorted({m.architecture for m in manifests}),
            "input_shapes": [list(s) for s in sorted({m.input_shape for m in manifests})],
            "num_classes": sorted({m.num_classes for m in manifests}), "dataset": dataset}


def calibrate(params: Params, zoo: ZooParams, reverse: bool = False) -> Path:
    """Scan the calibration zoo; fit the clean null; write the calibration file."""
    names = zoo.names("calibration")
    truth = {n: read_json(truth_path("calibration", n)) for n in names}
    scans = scan_zoo(names, params, zoo, reverse=reverse)
    write_json(SCANS / "calibration_zoo.json", scans)
    clean = [n for n in names if not truth[n]["backdoored"]]
    stats = [class_scores(scans[n]) for n in clean]
    provenance = {"zoo": "calibration", "clean_models": clean, "params_file": "zoo/params.yaml",
                  "code_version": _git_commit(),
                  "created": datetime.now(UTC).isoformat(timespec="seconds"),
                  "architectures": sorted({truth[n]["arch"] for n in clean}),
                  "dataset": "cifar10",
                  "coverage": coverage([stem_of(zoo, n) for n in clean], "cifar10"),
                  "reference": {"procedure": "tasks.scan.reference.reference_batch",
                                "pool": f"zoo reference part of the CIFAR-10 test set "
                                        f"({zoo.data.n_reference} images)",
                                "count": params.scan.images, "seed": params.base.seed}}
    fitted = cal.fit(stats, params.scan.alpha, params.scan.floor,
                     scan_settings(params).fingerprint(), provenance)
    flagged = [n for n in names if truth[n]["backdoored"] and truth[n]["counts"]
               and p_value(fitted, scans[n])[0] <= fitted.alpha]
    fitted.provenance["calibration_zoo_backdoors_flagged"] = sorted(flagged)
    CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
    write_json(CALIBRATION, fitted.to_dict())
    return CALIBRATION


def benchmark(params: Params, zoo: ZooParams, command: str, reverse: bool = False) -> Path:
    """Scan the test zoo with the scan settings and with the old detector; record the scans and
    how they were made (the settings, which the report checks against the calibration's)."""
    names = zoo.names("test")
    load = os.getloadavg()
    scans = scan_zoo(names, params, zoo, before=True, reverse=reverse)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__} on {torch.get_num_threads()} threads; load average "
               f"before the scans {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    write_json(SCANS / "test_zoo.json", scans)
    write_json(SCANS / "test_zoo_meta.json", {
        "command": command, "machine": machine, "code_version": _git_commit(),
        "settings": scan_settings(params).fingerprint()})
    return SCANS / "test_zoo.json"


def main(argv: list[str] | None = None) -> None:
    """Command line: calibrate | benchmark."""
    ap = argparse.ArgumentParser(prog="python -m tasks.zoo.scan")
    ap.add_argument("command", choices=("calibrate", "benchmark"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--zoo", default="zoo/params.yaml")
    ap.add_argument("--reverse", action="store_true",
                    help="scan the last model first: a helper beside the stage's own run")
    args = ap.parse_args(argv)
    params, zoo = load_params(args.params), load_zoo_params(args.zoo)
    if args.command == "calibrate":
        print(calibrate(params, zoo, args.reverse))
    else:
        print(benchmark(params, zoo, "python -m tasks.zoo.scan benchmark", args.reverse))


if __name__ == "__main__":
    main()
