"""What a scan says about one model: the one verdict type of every decision in mesa_lib.

`mesa_lib.calibration.decide` makes it against clean models (a conformal p-value); the
uncalibrated MESA decision of `mesa_lib.detect.decide` (the detector of an earlier release,
kept for the zoo benchmark's "before" column) makes the same type without a p-value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Verdict:
    """A verdict on one model.

    Attributes:
        status: "clean" or "backdoored".
        target: the suspected target class (None when clean).
        p_value: conformal p-value against the clean calibration models (None: uncalibrated).
        confidence: in [0, 1], confidence in `status` (calibrated: 1 - p_value).
        detector: the detector that fired (or would have).
        reason: one line for people.
        detectors: detector -> its summary, e.g. {"statistic", "p_value", "target", "seconds"}.
        per_class: detector -> class -> that detector's evidence of the class.
        targets: every flagged class, `target` first (a model may have several backdoors).
    """

    status: Literal["clean", "backdoored"]
    target: int | None
    p_value: float | None
    confidence: float
    detector: str
    reason: str
    detectors: dict[str, dict[str, float]]
    per_class: dict[str, dict[int, dict[str, float]]]
    targets: tuple[int, ...] = ()
