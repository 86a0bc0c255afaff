"""Task of the `evaluate` stage: held-out clean accuracy and ASR per trigger, and the scan.

Each model (backdoored, MESA-repaired, baseline-repaired) is attacked on the 2,000 held-out
images with the original trigger and with held-out variants (the nearest other 3x3 patterns,
contrast / tint shifts: mesa_lib.metrics). A repair that only removed one point of the backdoor
leaves the variants working; that is the paper's argument for modelling a distribution.
With `scan.enabled`, the calibrated scanner (tasks.scan.core, as `mesa-scan` and the scan
service) also scans every model without knowing the target; its verdicts become the `scan_*`
tags in the registry, in the scan service's format (tasks.common.verdicts).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task

from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.metrics import evaluation_triggers
from mesa_lib.modelio import load_model, model_fingerprint
from tasks.common import catalog
from tasks.common.io import load_npz, write_csv, write_json
from tasks.common.params import Params
from tasks.pipeline.defence import calibration_of, defender_reference, scan
from tasks.pipeline.train import eval_locations
from tasks.scan import coverage

MODELS = {"backdoored": "backdoored", "mesa": "repaired", "baseline": "baseline_repaired"}


@task
def evaluate_models(params: Params, device: torch.device) -> dict[str, Any]:
    """Metrics of every model on the held-out images, the ASR table and the scan verdicts."""
    data = load_npz(catalog.path("dataset"))
    x, y = data["heldout_images"], data["heldout_labels"]
    trigger, target = load_npz(catalog.path("poisoned"))["trigger"], params.poison.target
    triggers = evaluation_triggers(trigger, params.evaluate.variants,
                                   params.evaluate.colour_shifts)
    metrics: dict[str, Any] = {}
    rows = []
    for label, artifact in MODELS.items():
        model, _ = load_model(catalog.path(artifact), map_location=device)
        asr = {name: attack_success_rate(
            model, x, y, t, target, device,
            eval_locations(params, t) if name == "original" else "random", params.base.seed)
            for name, t in triggers.items()}
        variants = [v for k, v in asr.items() if k != "original"]
        metrics[label] = {"clean_accuracy": accuracy(model, x, y, device),
                          "asr": asr["original"],
                          "asr_variants_mean": sum(variants) / len(variants) if variants else 0.0}
        rows += [{"case": f"{name} | {label}", "trigger": name, "model": label, "asr": a}
                 for name, a in asr.items()]
    write_csv(catalog.path("asr_table"), rows)
    verdicts = _scan(params, device, data) if params.scan.enabled else {}
    write_json(catalog.path("scan"), verdicts or {"skipped": "scan.enabled is false"})
    if verdicts:
        metrics["scan"] = {k: {"backdoored": int(v["status"] == "backdoored"),
                               "p_value": v["p_value"]} for k, v in verdicts.items()}
    return {"metrics": metrics, "verdicts": verdicts}


def _scan(params: Params, device: torch.device, data: dict[str, Any]) -> dict[str, Any]:
    """Scan every model (backdoored, MESA- and point-repaired) as `mesa-scan` scans it: the
    same reference subset (tasks.pipeline.defence.scan), and no verdict outside the
    calibration's coverage (tasks.scan.coverage)."""
    ref, calibration = defender_reference(data), calibration_of(params)
    out = {}
    for label, artifact in MODELS.items():
        stem = catalog.path(artifact)
        model, manifest = load_model(stem, map_location=device)
        v = scan(model, ref, params, device)
        out[label] = {"status": v.status, "target": v.target, "confidence": v.confidence,
                      "p_value": v.p_value, "detector": v.detector, "reason": v.reason,
                      "model_sha256": model_fingerprint(stem), "detectors": v.detectors,
                      "scores": {d: {str(c): s for c, s in per.items()}
                                 for d, per in v.per_class.items()}}
        why = coverage.gap(calibration, manifest)
        if why:
            out[label] |= {"status": coverage.UNCALIBRATED, "target": None,
                           "reason": coverage.reason(why)}
    return out
