"""Verdicts only where the scanner is calibrated.

A calibration is a null of clean models' scores: of some architectures, input shapes and class
counts (its `provenance.coverage`, written by `tasks.zoo.scan calibrate` from the clean models'
manifests). A model outside that is judged against a null it is not part of, so its p-value
means nothing: `mesa-scan`, the scan service and the pipeline give it the verdict
`uncalibrated` (its scores still shown; exit code 4 in `mesa-scan`) unless a calibration that
covers it is given (`--calibration FILE`, params `scan.calibration`).

A calibration file without a coverage record (made before coverage was written) is held to the
architectures its provenance names, if any.
"""

from __future__ import annotations

from typing import Any

from mesa_lib.calibration import Calibration, CalibrationError
from mesa_lib.modelio import Manifest
from tasks.common.escape import escape

UNCALIBRATED = "uncalibrated"


def coverage_of(calibration: Calibration) -> dict[str, Any]:
    """What the calibration's clean models were: architectures, input shapes, class counts."""
    provenance = calibration.provenance or {}
    if "coverage" not in provenance:
        return {"architectures": provenance["architectures"]} if "architectures" in provenance \
            else {}
    cov = provenance["coverage"]
    if not isinstance(cov, dict) or not all(isinstance(v, list | str) for v in cov.values()):
        raise CalibrationError(f"the calibration's provenance.coverage must map keys to lists, "
                               f"got {escape(repr(cov))[:200]}")
    return cov


def gap(calibration: Calibration, manifest: Manifest) -> str:
    """Why `calibration` does not cover a model of `manifest`; '' when it does."""
    cov = coverage_of(calibration)
    checks = (("architecture", manifest.architecture, cov.get("architectures")),
              ("input shape", list(manifest.input_shape), cov.get("input_shapes")),
              ("class count", manifest.num_classes, cov.get("num_classes")))
    return "; ".join(f"its {what} {escape(repr(value))} is not among the calibration's "
                     f"{escape(known)}" for what, value, known in checks
                     if known is not None and value not in known)


def reason(why: str) -> str:
    """The verdict reason of a model outside the calibration."""
    return (f"outside the calibration: {why}; its scores are shown but the "
            "clean null they would be judged against holds no model like it (give a "
            "calibration fitted on such models: --calibration FILE / scan.calibration)")
