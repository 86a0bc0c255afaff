"""Calibrated verdicts: each detector's statistic against the same statistic on clean models.

A scanner is only usable when its false-alarm rate is known. The detectors (mesa_lib.detectors)
give uncalibrated statistics; this module turns them into conformal p-values (Vovk et al. 2005;
Bates et al., "Testing for outliers with conformal p-values", 2023). Given the statistics s_1..s_n
of n clean calibration models, a new model's p-value is

    p = (1 + #{i : s_i >= s}) / (n + 1),

and if the new model is clean (exchangeable with the calibration models), P(p <= alpha) <= alpha:
flagging at p <= alpha bounds the false-alarm rate by alpha. With several detectors the model's
statistic is c = min over detectors of their p-values; c is itself calibrated the same way on the
calibration models' leave-one-out values of c, so the bound holds for the combination too. A
p <= 0.05 needs n >= 19 clean calibration models.

The calibration is a versioned JSON file (`to_dict` / `from_dict`) recording the settings it is
valid for; a missing, malformed or mismatched file is a `CalibrationError` naming the file and
the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mesa_lib.detectors import DetectorScore

FORMAT = "mesa-scan-calibration"
VERSION = 1


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or made for other scan settings."""


def conformal_p(null: Sequence[float], statistic: float) -> float:
    """(1 + #{null >= statistic}) / (n + 1): small when the statistic exceeds the clean ones."""
    return (1 + sum(1 for s in null if s >= statistic)) / (len(null) + 1)


@dataclass(frozen=True)
class Calibration:
    """The clean-model null of each detector and of their combination.

    Attributes:
        alpha: the false-alarm rate a verdict is made at (flag iff p <= alpha).
        settings: the scan settings the statistics were measured with (ScanSettings.fingerprint).
        null: detector -> statistics of the clean calibration models, one per model.
        combined_null: each clean calibration model's leave-one-out min-p over the detectors.
        provenance: the zoo, its models, the code version and the date it came from.
    """

    alpha: float
    settings: dict[str, Any]
    null: dict[str, tuple[float, ...]]
    combined_null: tuple[float, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def detectors(self) -> tuple[str, ...]:
        """The calibrated detectors."""
        return tuple(self.null)

    def detector_p(self, detector: str, statistic: float) -> float:
        """Conformal p-value of one detector's statistic."""
        return conformal_p(self.null[detector], statistic)

    def combined(self, statistics: Mapping[str, float]) -> tuple[float, str]:
        """(p-value of the min-p combination, the detector with the smallest p)."""
        ps = {d: self.detector_p(d, statistics[d]) for d in self.detectors}
        fired = min(ps, key=lambda d: (ps[d], -statistics[d]))
        c = ps[fired]
        p = (1 + sum(1 for v in self.combined_null if v <= c)) / (len(self.combined_null) + 1)
        return p, fired

    def to_dict(self) -> dict[str, Any]:
        """The JSON file's content."""
        return {"format": FORMAT, "version": VERSION, "alpha": self.alpha,
                "settings": self.settings, "null": {d: list(v) for d, v in self.null.items()},
                "combined_null": list(self.combined_null), "provenance": self.provenance}

    @classmethod
    def from_dict(cls, raw: Any, source: str = "calibration") -> Calibration:
        """Validate a decoded calibration file; every problem names `source` and the field."""

        def bad(field_name: str, want: str, got: Any) -> CalibrationError:
            return CalibrationError(f"{source}: field {field_name!r} must be {want}, "
                                    f"got {got!r}"[:500])

        if not isinstance(raw, dict):
            raise bad("(top level)", "a JSON object", type(raw).__name__)
        if raw.get("format") != FORMAT:
            raise bad("format", repr(FORMAT), raw.get("format"))
        if raw.get("version") != VERSION:
            raise bad("version", str(VERSION), raw.get("version"))
        alpha = raw.get("alpha")
        if not _number(alpha) or not 0 < alpha < 1:
            raise bad("alpha", "a number in (0, 1)", alpha)
        if not isinstance(raw.get("settings"), dict):
            raise bad("settings", "an object", raw.get("settings"))
        null = raw.get("null")
        if not isinstance(null, dict) or not null:
            raise bad("null", "an object of detector -> list of numbers", null)
        n = None
        for det, values in null.items():
            if not isinstance(values, list) or not values or not all(map(_number, values)):
                raise bad(f"null.{det}", "a non-empty list of numbers", values)
            if n is not None and len(values) != n:
                raise bad(f"null.{det}", f"{n} values (one per calibration model)", len(values))
            n = len(values)
        combined = raw.get("combined_null")
        if not isinstance(combined, list) or len(combined) != n or \
                not all(_number(v) and 0 < v <= 1 for v in combined):
            raise bad("combined_null", f"{n} p-values in (0, 1]", combined)
        nulls = {d: tuple(map(float, v)) for d, v in null.items()}
        return cls(float(alpha), raw["settings"], nulls, tuple(map(float, combined)),
                   raw.get("provenance") or {})

    def check_settings(self, settings: Mapping[str, Any], source: str = "calibration") -> None:
        """Refuse scan settings other than those the null was measured with, naming the field."""
        for key in sorted(set(self.settings) | set(settings)):
            if self.settings.get(key) != settings.get(key):
                raise CalibrationError(
                    f"{source}: field 'settings.{key}' is {self.settings.get(key)!r} in the "
                    f"calibration but {settings.get(key)!r} in the scan settings; recalibrate "
                    "(dvc repro zoo/dvc.yaml:calibrate) or scan with the calibrated settings")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fit(clean: Sequence[Mapping[str, float]], alpha: float, settings: dict[str, Any],
        provenance: dict[str, Any] | None = None) -> Calibration:
    """Calibrate on the detector statistics of clean models (one mapping per model).

    Raises:
        ValueError: fewer clean models than alpha allows to ever flag (n + 1 <= 1 / alpha).
    """
    n = len(clean)
    if n < 1 or (n + 1) * alpha < 1:
        raise ValueError(f"{n} clean calibration models cannot give a p-value <= {alpha}; "
                         f"need at least {math.ceil(1 / alpha) - 1}")
    detectors = tuple(clean[0])
    null = {d: tuple(float(m[d]) for m in clean) for d in detectors}
    combined = []
    for i in range(n):  # leave model i out of the null it is compared with
        ps = [conformal_p(null[d][:i] + null[d][i + 1:], null[d][i]) for d in detectors]
        combined.append(min(ps))
    return Calibration(alpha, dict(settings), null, tuple(combined), dict(provenance or {}))


@dataclass(frozen=True)
class Verdict:
    """A calibrated verdict on one model.

    Attributes:
        status: "clean" or "backdoored" (p_value <= alpha).
        target: the suspected target class (None when clean).
        p_value: conformal p-value against the clean calibration models.
        confidence: 1 - p_value (how unlike the clean models the scan looks).
        detector: the detector with the smallest p-value (what fired, when flagged).
        reason: one line for people.
        detectors: detector -> {"statistic", "p_value", "target", "seconds"}.
        per_class: detector -> class -> that detector's evidence.
    """

    status: Literal["clean", "backdoored"]
    target: int | None
    p_value: float
    confidence: float
    detector: str
    reason: str
    detectors: dict[str, dict[str, float]]
    per_class: dict[str, dict[int, dict[str, float]]]


def decide(scores: Mapping[str, DetectorScore], calibration: Calibration) -> Verdict:
    """Compare a model's detector statistics with the calibration's clean null."""
    missing = [d for d in calibration.detectors if d not in scores]
    if missing:
        raise CalibrationError(f"the calibration needs detectors {missing}, not run")
    stats = {d: scores[d].statistic for d in calibration.detectors}
    p, fired = calibration.combined(stats)
    flagged = p <= calibration.alpha
    top = scores[fired]
    summary = {d: {"statistic": s.statistic, "p_value": calibration.detector_p(d, s.statistic),
                   "target": s.target, "seconds": s.seconds}
               for d, s in scores.items() if d in calibration.null}
    if flagged:
        reason = (f"{fired} detector: class {top.target} stands out (statistic "
                  f"{top.statistic:.2f}; p = {p:.3f} against {len(calibration.combined_null)} "
                  f"clean models, alpha {calibration.alpha})")
    else:
        reason = f"no class stands out (p = {p:.3f} > alpha {calibration.alpha})"
    return Verdict("backdoored" if flagged else "clean", top.target if flagged else None, p,
                   1 - p, fired, reason, summary, {d: s.per_class for d, s in scores.items()})
