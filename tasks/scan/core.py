"""The scan core: one model in, a calibrated verdict out. `mesa-scan`, the scan flows and the
pipeline's `evaluate` stage all go through it.

    inspect(stem, reference)            safety checks; a bad file -> Rejected(reason)
    measure_chunk(model, ..., classes)  every detector's evidence on some classes (a task each)
    decide(chunks, calibration)         reduce over all classes, compare with the clean null

A verdict record (the JSON `mesa-scan --format json` prints and the scan service logs) holds
`verdict` (clean | backdoored | rejected), `target`, `targets` (every flagged class, `target`
first), `p_value`, `confidence` (1 - p),
`detector` (the one with the smallest p: what fired), `reason`, per-detector statistics and
per-class scores, and timings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mesa_lib import modelfiles
from mesa_lib.calibration import Calibration, CalibrationError, decide
from mesa_lib.detectors import ScanSettings, measure, reduce
from mesa_lib.modelio import Manifest, ModelFileError
from mesa_lib.verdict import Verdict
from tasks.common.escape import escape


class Rejected(ValueError):
    """A model that cannot be scanned safely; the message is the reason (names the file)."""


def load_calibration(path: Path, settings: ScanSettings) -> Calibration:
    """Read a calibration file and check it was made for `settings`.

    Raises:
        CalibrationError: missing, unreadable, malformed or mismatched; names the file and field.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file is missing; make it with "
                               "`dvc repro zoo/dvc.yaml:calibrate`") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CalibrationError(f"{path}: not a readable JSON calibration ({err})") from None
    calibration = Calibration.from_dict(raw, str(path))
    calibration.check_settings(settings.fingerprint(), str(path))
    return calibration


def inspect(stem: Path, n_classes: int, image_shape: tuple[int, ...], probe: Tensor,
            device: torch.device) -> tuple[nn.Module, Manifest]:
    """Load a model file pair safely and check it fits the reference data.

    Args:
        stem: the model's path without suffix (`<stem>.safetensors` + `<stem>.json`).
        n_classes, image_shape: of the reference data.
        probe: two reference images, uint8 (2, C, H, W), for one finite forward pass.

    Raises:
        Rejected: never a pickle, never a bad shape: the reason names the file.
    """
    try:
        model, manifest = modelfiles.load(stem, map_location=device)
    except ModelFileError as err:
        raise Rejected(str(err)) from None
    if manifest.num_classes != n_classes:
        raise Rejected(f"{stem}: class count {manifest.num_classes} in the manifest differs "
                       f"from the {n_classes} classes of the reference data")
    if tuple(manifest.input_shape) != tuple(image_shape):
        raise Rejected(f"{stem}: input shape {list(manifest.input_shape)} differs from the "
                       f"reference images' {list(image_shape)}")
    with torch.no_grad():
        out = model(probe.to(device).float().div(255))
    if out.shape != (len(probe), n_classes) or not torch.isfinite(out).all():
        raise Rejected(f"{stem}: forward pass gives {tuple(out.shape)} / non-finite logits")
    return model, manifest


@dataclass(frozen=True)
class ChunkResult:
    """Every detector's evidence on a chunk of a model's classes (small, picklable).

    Attributes:
        classes: the chunk.
        evidence: detector -> class -> raw measurements.
        samples: detector -> class -> recovered triggers as nested lists (k, C, h, w).
        seconds: detector -> wall time on this chunk.
    """

    classes: tuple[int, ...]
    evidence: dict[str, dict[int, dict[str, float]]]
    samples: dict[str, dict[int, list]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def measure_chunk(model: nn.Module, images: Tensor, labels: Tensor | None,
                  classes: tuple[int, ...], settings: ScanSettings, device: torch.device,
                  keep: int = 8) -> ChunkResult:
    """Run every detector of `settings` on `classes` (all of them: one chunk per model)."""
    evidence, samples, seconds = {}, {}, {}
    for name in settings.names:
        ev, smp, sec = measure(name, model, images, labels, tuple(classes), settings, device)
        evidence[name], seconds[name] = ev, sec
        samples[name] = {c: s[:keep].cpu().tolist() for c, s in smp.items()}
    return ChunkResult(tuple(classes), evidence, samples, seconds)


def merge(chunks: list[ChunkResult]) -> dict[str, Any]:
    """Each detector's score over all the chunks' classes."""
    names = chunks[0].evidence.keys() if chunks else ()
    return {d: reduce(d, {c: e for ch in chunks for c, e in ch.evidence[d].items()},
                      seconds=sum(ch.seconds.get(d, 0.0) for ch in chunks)) for d in names}


def verdict_of(chunks: list[ChunkResult], calibration: Calibration) -> Verdict:
    """The calibrated verdict over every chunk of one model."""
    return decide(merge(chunks), calibration)


def record(label: str, verdict: Verdict | None, reason: str = "",
           seconds: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """The verdict record of one model (`verdict=None`: rejected for `reason`)."""
    out: dict[str, Any] = {"model": escape(label)}
    if verdict is None:
        out |= {"verdict": "rejected", "target": None, "targets": [], "confidence": 1.0,
                "p_value": None, "detector": None, "reason": escape(reason), "detectors": {},
                "scores": {}}
    else:
        out |= {"verdict": verdict.status, "target": verdict.target,
                "targets": list(verdict.targets), "confidence": verdict.confidence,
                "p_value": verdict.p_value, "detector": verdict.detector, "reason": verdict.reason,
                "detectors": verdict.detectors,
                "scores": {d: {str(c): s for c, s in per.items()}
                           for d, per in verdict.per_class.items()}}
    return out | {"seconds": seconds or {}} | extra
