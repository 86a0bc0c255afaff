"""Calibrated verdicts: each class compared with the same class in clean models.

A scanner is only usable when its false-alarm rate is known. The detectors (mesa_lib.detectors)
score every class of a model by how much easier it is to reach than the model's median class.
Some classes are easy in every clean model (a naive outlier test then flags clean models), so
each class's score a_k is standardised against that class in the n clean calibration models:

    z_k = (a_k - median_i a_ik) / max(1.4826 MAD_i a_ik, floor),   statistic = max_k z_k,

and the class with the largest z is the suspected target. The statistic is then turned into a
conformal p-value (Vovk et al. 2005; Bates et al., "Testing for outliers with conformal
p-values", 2023) against the statistics of the clean calibration models, each computed leave-one-
out (its own scores left out of the class references), so that a clean model scanned later is
exchangeable with them:

    p = (1 + #{i : s_i >= s}) / (n + 1),   P(p <= alpha) <= alpha for a clean model.

With several detectors (`pooled_p`), each detector's statistics of the n + 1 models (the clean
ones and the new one) are put on one scale (their median and MAD), a model's combined statistic
is its largest scaled value, and p is the share of the n + 1 at or above the new model's. That is
a symmetric function of the pool, so the bound above holds for the combination too. (Taking the
smallest per-detector p-value instead, calibrated against the clean models' own, mixes p-values
of two granularities, 1/(n+1) and 1/n: it raised the false-alarm rate to 7.7% at alpha 5% in
tests/test_scanner.py's simulation.) Flagging at p <= alpha bounds the false-alarm rate by
alpha; p <= 0.05 needs n >= 19 clean calibration models.

The calibration is a versioned JSON file (`to_dict` / `from_dict`) recording the settings it is
valid for; a missing, malformed or mismatched file is a `CalibrationError` naming the file and
the field.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesa_lib.detectors import DetectorScore
from mesa_lib.verdict import Verdict

FORMAT = "mesa-scan-calibration"
VERSION = 2  # 2: settings keyed by detector (ScanSettings.fingerprint); 1 is still read
MAD_CONSISTENCY = 1.4826
ClassScores = Mapping[int, float]


class CalibrationError(ValueError):
    """A calibration file is missing, malformed, or made for other scan settings."""


def conformal_p(null: Sequence[float], statistic: float) -> float:
    """(1 + #{null >= statistic}) / (n + 1): small when the statistic exceeds the clean ones."""
    return (1 + sum(1 for s in null if s >= statistic)) / (len(null) + 1)


def _robust_scaled(values: Sequence[float]) -> list[float]:
    """(v - median) / (1.4826 MAD) of each value (MAD 0: the mean absolute deviation, then 1)."""
    med = statistics.median(values)
    dev = [abs(v - med) for v in values]
    scale = statistics.median(dev) * MAD_CONSISTENCY or statistics.fmean(dev) or 1.0
    return [(v - med) / scale for v in values]


def pooled_p(null: Mapping[str, Sequence[float]], new: Mapping[str, float]) -> tuple[float, str]:
    """(conformal p of `new` among the clean models over all detectors, the detector it fired).

    Args:
        null: detector -> the n clean models' statistics.
        new: detector -> the new model's statistic.
    """
    detectors = list(null)
    scaled = {d: _robust_scaled([*null[d], new[d]]) for d in detectors}
    pool = len(scaled[detectors[0]])
    combined = [max(scaled[d][j] for d in detectors) for j in range(pool)]
    p = sum(1 for t in combined if t >= combined[-1]) / pool
    return p, max(detectors, key=lambda d: scaled[d][-1])


def reference(clean: Sequence[ClassScores], floor: float) -> tuple[list[float], list[float]]:
    """Per class: (median, max(1.4826 MAD, floor)) of the clean models' scores."""
    classes = sorted(clean[0])
    centre, scale = [], []
    for c in classes:
        values = [m[c] for m in clean]
        med = statistics.median(values)
        mad = statistics.median(abs(v - med) for v in values) * MAD_CONSISTENCY
        centre.append(med)
        scale.append(max(mad, floor))
    return centre, scale


def standardise(scores: ClassScores, centre: Sequence[float], scale: Sequence[float]
                ) -> tuple[float, int, dict[int, float]]:
    """(max_k z_k, its class, every z_k) of one model's class scores."""
    z = {c: (scores[c] - centre[c]) / scale[c] for c in sorted(scores)}
    top = max(z, key=lambda c: (z[c], -c))
    return z[top], top, z


@dataclass(frozen=True)
class Calibration:
    """The clean-model references and nulls of each detector, and of their combination.

    Attributes:
        alpha: the false-alarm rate a verdict is made at (flag iff p <= alpha).
        floor: smallest scale of a class's clean scores (MAD of a few dozen values is noisy).
        settings: the scan settings the scores were measured with (ScanSettings.fingerprint).
        centre, scale: detector -> per class, the clean models' median score and its scale.
        null: detector -> each clean calibration model's leave-one-out statistic.
        combined_null: each clean calibration model's own combined p-value among the others
            (what the false-alarm rate looks like on the calibration zoo; for reading).
        provenance: the zoo, its models, the code version and the date it came from.
    """

    alpha: float
    floor: float
    settings: dict[str, Any]
    centre: dict[str, tuple[float, ...]]
    scale: dict[str, tuple[float, ...]]
    null: dict[str, tuple[float, ...]]
    combined_null: tuple[float, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def detectors(self) -> tuple[str, ...]:
        """The calibrated detectors."""
        return tuple(self.null)

    @property
    def classes(self) -> int:
        """Number of classes of the models it was fitted on."""
        return len(next(iter(self.centre.values())))

    def statistic(self, detector: str, scores: ClassScores) -> tuple[float, int, dict[int, float]]:
        """(statistic, suspected class, every class's z) of one detector's class scores."""
        if len(scores) != self.classes:
            raise CalibrationError(f"calibration: field 'centre.{detector}' has {self.classes} "
                                   f"classes, the model {len(scores)}")
        return standardise(scores, self.centre[detector], self.scale[detector])

    def detector_p(self, detector: str, statistic: float) -> float:
        """Conformal p-value of one detector's statistic."""
        return conformal_p(self.null[detector], statistic)

    def combined(self, statistics_: Mapping[str, float]) -> tuple[float, str]:
        """(conformal p-value over all detectors, the detector that stands out most)."""
        return pooled_p(self.null, statistics_)

    def to_dict(self) -> dict[str, Any]:
        """The JSON file's content."""
        return {"format": FORMAT, "version": VERSION, "alpha": self.alpha, "floor": self.floor,
                "settings": self.settings,
                "centre": {d: list(v) for d, v in self.centre.items()},
                "scale": {d: list(v) for d, v in self.scale.items()},
                "null": {d: list(v) for d, v in self.null.items()},
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
        if raw.get("version") not in (1, VERSION):
            raise bad("version", f"1 or {VERSION}", raw.get("version"))
        for key, low, high in (("alpha", 0, 1), ("floor", 0, math.inf)):
            if not _number(raw.get(key)) or not low < raw[key] < high:
                raise bad(key, f"a number in ({low}, {high})", raw.get(key))
        if not isinstance(raw.get("settings"), dict):
            raise bad("settings", "an object", raw.get("settings"))
        null = _lists(raw, "null", bad, None)
        centre = _lists(raw, "centre", bad, set(null))
        scale = _lists(raw, "scale", bad, set(null))
        combined = raw.get("combined_null")
        # The lengths most lists agree on, so the error names the odd one out, not its peers.
        n = _usual_length([*null.values(), combined if isinstance(combined, list) else []])
        k = _usual_length([*centre.values(), *scale.values()])
        for name, table, length in (("null", null, n), ("centre", centre, k), ("scale", scale, k)):
            for det, values in table.items():
                if len(values) != length:
                    raise bad(f"{name}.{det}", f"{length} values", len(values))
        if any(v <= 0 for values in scale.values() for v in values):
            raise bad("scale", "positive numbers", scale)
        if not isinstance(combined, list) or len(combined) != n or \
                not all(_number(v) and 0 < v <= 1 for v in combined):
            raise bad("combined_null", f"{n} p-values in (0, 1]", combined)
        try:
            settings = raw["settings"] if raw["version"] == VERSION \
                else settings_v1(raw["settings"])
        except (KeyError, TypeError, IndexError) as err:
            raise bad("settings", "version 1 scan settings", f"{raw['settings']} ({err})") \
                from None
        return cls(float(raw["alpha"]), float(raw["floor"]), settings, centre, scale,
                   null, tuple(map(float, combined)), raw.get("provenance") or {})

    def check_settings(self, settings: Mapping[str, Any], source: str = "calibration") -> None:
        """Refuse scan settings other than those the null was measured with, naming the field."""
        mine, theirs = _flat(self.settings), _flat(settings)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise CalibrationError(
                    f"{source}: field 'settings.{key}' is {mine.get(key)!r} in the "
                    f"calibration but {theirs.get(key)!r} in the scan settings; recalibrate "
                    "(dvc repro zoo/dvc.yaml:calibrate, then release zoo/calibration.json as "
                    "calibration/scanner.json) or scan with the calibrated settings")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} of a nested mapping; a mapping's absence shows as its own key.

    (tasks.common.settings.leaves does the same for params files; mesa_lib may not import
    tasks, and reading params may not import this module's torch-bound neighbours.)"""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 file's settings (flat `mask_*` keys, MESA's always present) in version 2's
    form (ScanSettings.fingerprint: only the detectors run, keyed by name). The mask search's
    init_cost and cost_step were constants (1e-3, 1.2) when version 1 was written. Read-only: a
    re-fitted calibration is written as version 2."""
    blocks: dict[str, Any] = {}
    for name in old.get("detectors", []):
        if name == "mask":
            blocks["mask"] = {"steps": old["mask_steps"], "batch_size": old["mask_batch_size"],
                              "lr": old["mask_lr"], "asr_threshold": old["mask_asr"],
                              "init_cost": 1e-3, "cost_step": 1.2}
        elif name == "mesa":
            m = old["mesa"]
            blocks["mesa"] = {"beta": m["betas"][0], "epochs": m["epochs"],
                              "batch_size": m["batch_size"], "lr": m["lr"],
                              "hidden": m["hidden"], "alpha": m["alpha"],
                              "trigger_noise": m["trigger_noise"],
                              "eval_images": old["mesa_eval_images"],
                              "trigger_size": old["trigger_size"]}
    return {"detectors": blocks, "images": old.get("images"), "seed": old.get("seed")}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _usual_length(lists: Sequence[Sequence[Any]]) -> int:
    """The most common length among `lists` (ties: the first seen)."""
    return collections.Counter(map(len, lists)).most_common(1)[0][0]


def _lists(raw: dict, key: str, bad: Any, detectors: set[str] | None
           ) -> dict[str, tuple[float, ...]]:
    """`raw[key]`: detector -> non-empty list of numbers (for exactly `detectors`)."""
    table = raw.get(key)
    if not isinstance(table, dict) or not table or \
            (detectors is not None and set(table) != detectors):
        want = "an object of detector -> list of numbers" + (
            f" for {sorted(detectors)}" if detectors else "")
        raise bad(key, want, table)
    for det, values in table.items():
        if not isinstance(values, list) or not values or not all(map(_number, values)):
            raise bad(f"{key}.{det}", "a non-empty list of numbers", values)
    return {d: tuple(map(float, v)) for d, v in table.items()}


def fit(clean: Sequence[Mapping[str, ClassScores]], alpha: float, floor: float,
        settings: dict[str, Any], provenance: dict[str, Any] | None = None) -> Calibration:
    """Calibrate on the class scores of clean models (one mapping detector -> scores per model).

    Raises:
        ValueError: fewer clean models than alpha allows to ever flag (n + 1 <= 1 / alpha).
    """
    n = len(clean)
    if n < 2 or (n + 1) * alpha < 1:
        raise ValueError(f"{n} clean calibration models cannot give a p-value <= {alpha}; "
                         f"need at least {max(2, math.ceil(1 / alpha) - 1)}")
    detectors = tuple(clean[0])
    centre, scale, null = {}, {}, {}
    for d in detectors:
        per_model = [m[d] for m in clean]
        centre[d], scale[d] = (tuple(v) for v in reference(per_model, floor))
        loo = []
        for i in range(n):  # model i is scored against the others only
            c, s = reference(per_model[:i] + per_model[i + 1:], floor)
            loo.append(standardise(per_model[i], c, s)[0])
        null[d] = tuple(loo)
    combined = [pooled_p({d: null[d][:i] + null[d][i + 1:] for d in detectors},
                         {d: null[d][i] for d in detectors})[0] for i in range(n)]
    return Calibration(alpha, floor, dict(settings), centre, scale, null, tuple(combined),
                       dict(provenance or {}))


def decide(scores: Mapping[str, DetectorScore], calibration: Calibration) -> Verdict:
    """Compare a model's class scores with the calibration's clean references and null."""
    missing = [d for d in calibration.detectors if d not in scores]
    if missing:
        raise CalibrationError(f"the calibration needs detectors {missing}, not run")
    stats = {d: calibration.statistic(d, scores[d].scores) for d in calibration.detectors}
    p, fired = calibration.combined({d: s[0] for d, s in stats.items()})
    flagged = p <= calibration.alpha
    statistic, target, _ = stats[fired]
    summary = {d: {"statistic": s[0], "p_value": calibration.detector_p(d, s[0]),
                   "target": s[1], "seconds": scores[d].seconds} for d, s in stats.items()}
    per_class = {d: {c: {**scores[d].per_class[c], "z": s[2][c]} for c in s[2]}
                 for d, s in stats.items()}
    n = len(calibration.combined_null)
    targets = flagged_classes(stats, calibration, target) if flagged else ()
    if flagged:
        reason = (f"{fired} detector: class {target} is {statistic:.1f} clean-model scales "
                  f"easier to reach than in clean models (p = {p:.3f} against {n} clean "
                  f"models, alpha {calibration.alpha})")
        if len(targets) > 1:
            reason += f"; classes {list(targets)} are all flagged"
    else:
        reason = f"no class stands out (p = {p:.3f} > alpha {calibration.alpha})"
    return Verdict("backdoored" if flagged else "clean", target if flagged else None, p, 1 - p,
                   fired, reason, summary, per_class, targets)


def flagged_classes(stats: Mapping[str, tuple[float, int, dict[int, float]]],
                    calibration: Calibration, target: int) -> tuple[int, ...]:
    """Every class whose own standardised scores would flag the model: `target` first, then
    the others by p-value.

    Each class k is tested with its own z_k in place of the maximum, against the same null of
    the maximum over classes (a single-step max-T procedure, Westfall and Young 1993): a clean
    model has any class flagged with probability <= alpha, so the extra targets cost no
    false-alarm rate."""
    classes = sorted(next(iter(stats.values()))[2])
    p_of = {k: calibration.combined({d: s[2][k] for d, s in stats.items()})[0] for k in classes}
    others = sorted((k for k in classes if k != target and p_of[k] <= calibration.alpha),
                    key=lambda k: (p_of[k], k))
    return (target, *others)
