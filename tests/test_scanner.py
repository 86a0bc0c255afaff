"""The scanner on tiny models trained here: calibrated on clean ones, it finds a backdoor at a
fixed corner and one larger than the default trigger, with their targets, and clears a clean
model it was not calibrated on; the calibration file round-trips and bad ones are refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from backdoor_fixture import CPU, build_lab

from mesa_lib import calibration as cal
from mesa_lib.detectors import MesaDetectorConfig, ScanSettings, run_detectors
from mesa_lib.masksearch import MaskSearchConfig
from mesa_lib.triggers import build_trigger
from tasks.scan.core import load_calibration

SETTINGS = ScanSettings(detectors={
    "mask": MaskSearchConfig(steps=200, batch_size=8),
    "mesa": MesaDetectorConfig(beta=0.8, epochs=2, batch_size=32, lr=0.003, hidden=64,
                               eval_images=100)}, images=256)
# Five clean calibration models allow p-values down to 1/6. A clean model is flagged with
# probability at most alpha (conformal): a fixed clean model (seed 25) checks the plumbing of the
# clean case, tests/test_scanner.py::test_conformal_p_values_bound_the_false_alarm_rate the rate.
ALPHA = 0.2


def _lab(**kwargs):
    return build_lab(classes=10, n_train=3000, epochs=10, **kwargs)


def _scan(lab) -> dict:
    return run_detectors(lab.model, lab.defender_x, lab.defender_y, 10, SETTINGS, CPU)


@pytest.fixture(scope="module")
def calibration() -> cal.Calibration:
    """Fitted on five clean tiny models (seeds 10-14)."""
    scores = []
    for seed in range(10, 15):
        scanned = _scan(_lab(backdoor=False, seed=seed))
        scores.append({d: s.scores for d, s in scanned.items()})
    return cal.fit(scores, ALPHA, 0.1, SETTINGS.fingerprint(), {"zoo": "tiny test models"})


def test_a_fixed_corner_backdoor_is_found_with_its_target(calibration) -> None:
    lab = _lab(backdoor=True, seed=21, location="corner", target=4)
    verdict = cal.decide(_scan(lab), calibration)
    assert (verdict.status, verdict.target) == ("backdoored", 4), verdict.reason
    assert verdict.detector == "mask"  # random-place MESA cannot see a corner-only backdoor
    assert verdict.p_value <= ALPHA and verdict.confidence == 1 - verdict.p_value


def test_a_trigger_larger_than_the_default_is_found(calibration) -> None:
    big = build_trigger("random_color", 5, 3, seed=7)  # 5x5, the default search is 3x3
    verdict = cal.decide(_scan(_lab(backdoor=True, seed=22, trigger=big, target=7)),
                         calibration)
    assert (verdict.status, verdict.target) == ("backdoored", 7), verdict.reason


def test_a_clean_model_outside_the_calibration_is_clean(calibration) -> None:
    # Any one clean model is flagged with probability up to alpha (1/6 here), so the plumbing is
    # checked on one whose statistic is far from the calibration's top: seed 25's mask
    # statistic is 0.55-0.61 under the avx512 and avx2 kernels, the clean null's 1.6-3.2.
    # (Seed 24, used before, scored 2.51 / 3.06 against null tops of 3.17 / 3.00: flagged on
    # one CPU, not the other.)
    verdict = cal.decide(_scan(_lab(backdoor=False, seed=25)), calibration)
    assert (verdict.status, verdict.target) == ("clean", None), verdict.reason
    assert verdict.p_value > ALPHA and set(verdict.detectors) == {"mask", "mesa"}


def test_conformal_p_values_bound_the_false_alarm_rate() -> None:
    """Exchangeable clean statistics: P(p <= alpha) <= alpha, for one detector and the pair."""
    rng = random.Random(0)

    def clean_model() -> dict[str, dict[int, float]]:  # class 2 is easy in every model
        return {"a": {k: rng.gauss(2.0 * (k == 2), 1) for k in range(5)},
                "b": {k: rng.expovariate(1) for k in range(5)}}

    alarms, trials = 0, 1000
    for _ in range(trials):
        fitted = cal.fit([clean_model() for _ in range(19)], 0.05, 0.1, {}, {})
        new = clean_model()
        stats = {d: fitted.statistic(d, new[d])[0] for d in ("a", "b")}
        alarms += fitted.combined(stats)[0] <= 0.05
    assert alarms / trials <= 0.05 + 3 * (0.05 * 0.95 / trials) ** 0.5
    assert cal.conformal_p([1.0, 2.0, 3.0], 10.0) == 0.25 and cal.conformal_p([1.0], 0.0) == 1


def test_fit_refuses_too_few_clean_models_for_alpha() -> None:
    with pytest.raises(ValueError, match="cannot give a p-value <= 0.05; need at least 19"):
        cal.fit([{"mask": {0: 1.0, 1: 0.0}}] * 10, 0.05, 0.1, {}, {})


def test_the_calibration_file_round_trips(calibration, tmp_path: Path) -> None:
    path = tmp_path / "scanner.json"
    path.write_text(json.dumps(calibration.to_dict()))
    back = load_calibration(path, SETTINGS)
    assert back == calibration
    stats = {"mask": 3.0, "mesa": 0.0}
    assert back.combined(stats) == calibration.combined(stats)


def test_an_easy_class_of_clean_models_is_not_a_backdoor(calibration) -> None:
    """Each class is compared with the same class of the clean models, not with the others."""
    easy = {d: dict.fromkeys(range(10), 0.0) for d in calibration.detectors}
    centre = calibration.centre["mask"]
    k = max(range(10), key=lambda c: centre[c])  # the class that is easiest in clean models
    easy["mask"] = {c: centre[c] for c in range(10)}  # exactly a typical clean model
    z, _, _ = calibration.statistic("mask", easy["mask"])
    assert z == pytest.approx(0.0) and centre[k] >= max(centre)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("alpha"), "field 'alpha' must be a number in (0, 1)"),
    (lambda d: d.update(alpha=1.5), "field 'alpha' must be a number in (0, 1), got 1.5"),
    (lambda d: d.update(format="other"), "field 'format' must be 'mesa-scan-calibration'"),
    (lambda d: d.update(version=3), "field 'version' must be 1 or 2, got 3"),
    (lambda d: d["null"].update(mask=[1.0]), "field 'null.mask' must be 5 values"),
    (lambda d: d["centre"].update(mask=[0.0]), "field 'centre.mask' must be 10 values"),
    (lambda d: d["scale"].pop("mesa"), "field 'scale' must be an object of detector"),
    (lambda d: d.update(floor=0), "field 'floor' must be a number in (0, inf)"),
    (lambda d: d["null"].update(mask=["x"] * 5), "field 'null.mask' must be a non-empty list"),
    (lambda d: d.update(combined_null=[0.5]), "field 'combined_null' must be 5 p-values"),
    (lambda d: d["settings"].update(images=1024),
     "field 'settings.images' is 1024 in the calibration but 256 in the scan settings"),
])
def test_bad_calibration_files_are_refused_naming_file_and_field(
        calibration, tmp_path: Path, change, message) -> None:
    raw = json.loads(json.dumps(calibration.to_dict()))
    change(raw)
    path = tmp_path / "scanner.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(cal.CalibrationError) as info:
        load_calibration(path, SETTINGS)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_missing_or_unreadable_calibration_is_named(tmp_path: Path) -> None:
    with pytest.raises(cal.CalibrationError, match="scanner.json: calibration file is missing"):
        load_calibration(tmp_path / "scanner.json", SETTINGS)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(cal.CalibrationError, match="bad.json: not a readable JSON"):
        load_calibration(tmp_path / "bad.json", SETTINGS)
