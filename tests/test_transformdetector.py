"""The scan's `transform` detector (mesa_lib.transformsearch, found through its entry point):
tiny models trained here with whole-image backdoors (mesa_lib.globalattacks) are flagged with
their targets, both targets of a model with two; a clean one is not; a repair against the
recovered transformation removes the backdoor and keeps the accuracy.

Measured on this machine (2026-12-05): class scores of the target 0.80 (SIG) and 0.88 (WaNet), of
any other class <= 0.24; the two-target model 0.72 and 0.55 against <= 0.12; the clean model's
largest 0.21 (p = 1.0 against the stated null of tests/pipeline_fixture.py). Repairs (MESA over
the recovered family, 2 epochs): SIG 98.8% -> 0.0%, WaNet 100% -> 2.3%, accuracy -0.2 points.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from backdoor_fixture import CPU, synthetic_data, tiny_cnn
from pipeline_fixture import PLUMBING_ALPHA, PLUMBING_FLOOR, plumbing_null
from test_globalattacks import CONFIGS

from mesa_lib.calibration import decide, fit
from mesa_lib.defence import DefenceConfig, defend, split
from mesa_lib.detectors import ScanSettings, detector, run_detectors, trigger_source
from mesa_lib.mesa import MesaConfig
from mesa_lib.poison import attack_from
from mesa_lib.repair import RepairConfig
from mesa_lib.train import TrainConfig, train
from mesa_lib.transformsearch import TransformSearchConfig

SETTINGS = ScanSettings({"transform": TransformSearchConfig(steps=300)}, images=512)
CALIBRATION = fit(plumbing_null(6, ("transform",)), PLUMBING_ALPHA, PLUMBING_FLOOR,
                  SETTINGS.fingerprint())
DEFENCE = DefenceConfig("mesa", RepairConfig(epochs=2, batch_size=64, lr=0.01, stamp_rate=0.5),
                        MesaConfig(epochs=2, batch_size=64, lr=5e-4), 1024)


def _attack(name: str, target: int):
    return attack_from(name, CONFIGS[name], target=target, seed=7 + target)


@functools.cache
def lab(*attacks: tuple[str, int]) -> torch.nn.Module:
    """The tiny CNN on the template task, poisoned by each (attack, target) in turn (trained
    once per module; copy it before changing it)."""
    x, y = synthetic_data(3000, 0)
    for name, target in attacks:
        dirty = _attack(name, target).poison_dataset(x, y)
        x, y = dirty.images, dirty.labels
    torch.manual_seed(0)
    model = tiny_cnn()
    train(model, x, y, TrainConfig(epochs=10, batch_size=64, lr=0.05, seed=0), CPU)
    return model.eval()


def scan(model: torch.nn.Module):
    images, labels = synthetic_data(512, 1)
    return decide(run_detectors(model, images, labels, 6, SETTINGS, CPU), CALIBRATION)


def test_the_detector_is_found_by_its_entry_point() -> None:
    assert detector("transform").config is TransformSearchConfig


@pytest.mark.parametrize("attack", ["sig", "wanet"])
def test_a_whole_image_backdoor_is_flagged_with_its_target(attack: str) -> None:
    verdict = scan(lab((attack, 0)))
    assert verdict.status == "backdoored" and verdict.targets == (0,), verdict.reason
    assert verdict.detector == "transform"


def test_a_two_target_model_reports_both_targets() -> None:
    model = lab(("sig", 0), ("wanet", 3))
    images, labels = synthetic_data(512, 2)
    assert _attack("sig", 0).success(model, images, labels, CPU) >= 0.8
    assert _attack("wanet", 3).success(model, images, labels, CPU) >= 0.8
    verdict = scan(model)
    assert verdict.status == "backdoored" and set(verdict.targets) == {0, 3}, verdict.reason


def test_a_clean_model_stays_clean() -> None:
    verdict = scan(lab())
    assert verdict.status == "clean", verdict.reason


@pytest.mark.parametrize("attack", ["sig", "wanet"])
def test_a_repair_against_the_recovered_transformation_removes_the_backdoor(
        attack: str) -> None:
    model = copy.deepcopy(lab((attack, 0)))
    x, y = synthetic_data(2000, 1)
    test_x, test_y = synthetic_data(1000, 2)
    parts = split(2000, torch.arange(256), 0.3, 0.2, seed=0)
    found = trigger_source("transform", model, x[parts.selection], y[parts.selection], 0,
                           SETTINGS, CPU)
    assert found.geometry.kind == "transform"
    assert _attack(attack, 0).success(model, test_x, test_y, CPU) >= 0.9
    outcome = defend(model, x, y, parts, [found], DEFENCE, CPU)
    assert outcome.passed, outcome.reason
    assert _attack(attack, 0).success(model, test_x, test_y, CPU) <= 0.1
    assert outcome.before.accuracy - outcome.after.accuracy <= 0.02
