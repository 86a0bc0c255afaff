"""Task of the `evaluate` stage: held-out clean accuracy and ASR per trigger, and the scan.

Each model (backdoored, MESA-repaired, baseline-repaired) is attacked on the 2,000 held-out
images with the original trigger and with held-out variants (the nearest other 3x3 patterns,
contrast / tint shifts: mesa_lib.metrics). A repair that only removed one point of the backdoor
leaves the variants working; that is the paper's argument for modelling a distribution.
With `scan.enabled`, mesa_lib.detect also scans the backdoored and the MESA-repaired models
without knowing the target; its verdicts become the `scan_*` tags in the registry, in the scan
service's format (tasks.registry.verdict_tags).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task
from torch import Tensor

from mesa_lib.detect import DetectConfig, Verdict, detect
from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.mesa import MesaConfig
from mesa_lib.metrics import colour_shifts, other_patterns
from mesa_lib.modelio import load_model, model_fingerprint
from tasks import catalog
from tasks.config import Params
from tasks.io import load_npz, seeded_subset, write_csv, write_json
from tasks.train import eval_locations

MODELS = {"backdoored": "backdoored", "mesa": "repaired", "baseline": "baseline_repaired"}


def eval_triggers(params: Params, trigger: Tensor) -> dict[str, Tensor]:
    """The original trigger plus its held-out variants, by name."""
    out = {"original": trigger}
    black_white = bool(((trigger == 0) | (trigger == 1)).all()) and bool(
        (trigger == trigger[:1]).all())
    if params.evaluate.variants and black_white:
        out |= other_patterns(trigger[0], params.evaluate.variants, trigger.shape[0])
    if params.evaluate.colour_shifts:
        out |= colour_shifts(trigger)
    return out


def scan_config(params: Params, n_classes: int) -> DetectConfig:
    """DetectConfig from the `scan` group (all classes are candidates)."""
    s, r = params.scan, params.recover
    mesa = MesaConfig(betas=(s.beta,), epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                      hidden=r.hidden, mine_hidden=r.mine_hidden, alpha=r.alpha,
                      trigger_noise=r.trigger_noise, seed=params.base.seed)
    return DetectConfig(mesa=mesa, candidates=tuple(range(n_classes)),
                        eval_images=s.eval_images, anomaly_threshold=s.anomaly_threshold,
                        min_asr=s.min_asr, seed=params.base.seed)


def _verdict_record(v: Verdict, sha: str) -> dict[str, Any]:
    return {"status": v.status, "target": v.target, "confidence": v.confidence,
            "reason": v.reason, "model_sha256": sha,
            "scores": {str(k): s for k, s in v.scores.items()}}


@task
def evaluate_models(params: Params, device: torch.device) -> dict[str, Any]:
    """Metrics of every model on the held-out images, the ASR table and the scan verdicts."""
    data = load_npz(catalog.path("dataset"))
    x, y = data["heldout_images"], data["heldout_labels"]
    trigger, target = load_npz(catalog.path("poisoned"))["trigger"], params.poison.target
    triggers = eval_triggers(params, trigger)
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
                               "confidence": v["confidence"]} for k, v in verdicts.items()}
    return {"metrics": metrics, "verdicts": verdicts}


def _scan(params: Params, device: torch.device, data: dict[str, Any]) -> dict[str, Any]:
    """Scan the backdoored and MESA-repaired models on a seeded defender subset."""
    images, labels = data["defender_images"], data["defender_labels"]
    order = seeded_subset(params.scan.n_images, len(images), params.base.seed + 2)
    config = scan_config(params, len(data["classes"]))
    out = {}
    for label in ("backdoored", "mesa"):
        stem = catalog.path(MODELS[label])
        model, _ = load_model(stem, map_location=device)
        verdict = detect(model, images[order], (3, 3, 3), config, device, labels[order])
        out[label] = _verdict_record(verdict, model_fingerprint(stem))
    return out
