"""Plug-ins defined here alone, each one registration, run end to end: a detector through the
scanner (params.yaml takes its block, checked against its config; the calibration's fingerprint
holds it; `mesa-scan` reports its scores; a repair gets its trigger source from the registry), and
an attack through the zoo (its entry's settings checked against its config; the model built and
its success measured by the attack's own code)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from backdoor_fixture import synthetic_data
from pipeline_fixture import ROOT, write_plumbing_calibration

from mesa_lib import detectors
from mesa_lib.distribution import ConstantSampler
from mesa_lib.geometry import Geometry, Placed
from mesa_lib.modelio import load_model
from mesa_lib.poison import ATTACKS, Attack, PoisonedSet, register
from tasks.common.configs import scan_settings
from tasks.common.params import ConfigError, apply_overrides, load_params
from tasks.scan.cli import main

MODELS = Path(__file__).parent / "fixtures" / "scan_models"
CALLS: list[tuple[tuple[int, ...], int, int]] = []


@dataclass(frozen=True)
class ShiftConfig:
    """A toy detector: how far a constant brightness shift pushes images to each class."""

    shift: float = field(default=0.2, metadata={"gt": 0, "le": 1})
    repeats: int = field(default=1, metadata={"ge": 1})
    seed: int = 0


def _measure(model, images, labels, classes, config: ShiftConfig, device):
    CALLS.append((tuple(classes), config.repeats, config.seed))
    x = (images.float() / 255 + config.shift).clamp(0, 1)
    with torch.no_grad():
        prob = model(x.to(device)).softmax(1).mean(0).cpu()
    evidence = {c: {"prob": float(prob[c])} for c in classes}
    return evidence, {c: torch.full((1, images.shape[1], 2, 2), config.shift) for c in classes}


def _reduce(evidence):
    return detectors.centred(evidence, "prob", lambda p: p)


def _trigger(model, images, labels, target, config: ShiftConfig, device):
    geometry = Geometry("patch", (2, 2), (0, 0))
    return Placed(ConstantSampler(torch.full((images.shape[1], 2, 2), config.shift)),
                  geometry), geometry


@pytest.fixture
def shift_detector():
    """The toy detector registered for one test, and gone after it."""
    detectors.register_detector("shift", ShiftConfig, _reduce, _trigger)(_measure)
    CALLS.clear()
    yield
    del detectors.DETECTORS["shift"]


def _params(root: Path, detectors_block: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = apply_overrides(raw, {"base.device": "cpu", "base.seed": 7, "scan.images": 64,
                                "scan.detectors": detectors_block,
                                "scan.calibration": str(root / "calibration.json")})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_detector_defined_in_a_test_scans_end_to_end(shift_detector, tmp_path, capsys) -> None:
    block = {"mask": {"steps": 4, "batch_size": 8}, "shift": {"repeats": 3}}
    params_path = _params(tmp_path, block)
    params = load_params(params_path)
    settings = scan_settings(params)
    assert settings.names == ("mask", "shift")
    assert settings.config("shift") == ShiftConfig(shift=0.2, repeats=3, seed=7)
    assert settings.fingerprint()["detectors"]["shift"] == {"shift": 0.2, "repeats": 3}

    write_plumbing_calibration(params_path, tmp_path / "calibration.json", classes=6)
    images, labels = synthetic_data(128, 1)
    np.savez(tmp_path / "reference.npz", images=images.numpy(), labels=labels.numpy(),
             classes=np.array([f"class{k}" for k in range(6)]))
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(MODELS / f"clean{suffix}", tmp_path / f"clean{suffix}")
    code = main([str(tmp_path / "clean"), "--params", str(params_path), "--reference",
                 str(tmp_path / "reference.npz"), "--format", "json"])
    (record,) = json.loads(capsys.readouterr().out)
    assert code == {"clean": 0, "backdoored": 1}[record["verdict"]]
    # the verdict pools both detectors' statistics against the calibration's null
    assert record["detector"] in ("mask", "shift") and 0 < record["p_value"] <= 1
    assert set(record["detectors"]) == {"mask", "shift"}
    assert set(record["scores"]["shift"]) == {str(c) for c in range(6)}
    assert CALLS == [((0, 1, 2, 3, 4, 5), 3, 7)]  # its config, with the scan's seed

    model, _ = load_model(tmp_path / "clean")
    found = detectors.trigger_source("shift", model, images, labels, 2, settings,
                                     torch.device("cpu"))
    assert (found.target, found.detector, found.geometry.size) == (2, "shift", (2, 2))
    stamped = found.trigger.apply(torch.zeros(1, 3, 16, 16))  # what a repair would stamp
    assert torch.equal(stamped[0, :, :2, :2], torch.full((3, 2, 2), 0.2))
    assert stamped[0, :, 2:].abs().sum() == 0


def test_its_block_is_checked_against_its_config(shift_detector, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"scan.detectors.shift.shift: Input should be less "
                                          r"than or equal to 1, got 2.0"):
        load_params(_params(tmp_path, {"shift": {"shift": 2.0}}))
    with pytest.raises(ConfigError, match="scan.detectors.shift.seed: unknown key"):
        load_params(_params(tmp_path, {"shift": {"seed": 3}}))  # the run's seed fills it
    defaults = scan_settings(load_params(_params(tmp_path, {"shift": None})))
    assert defaults.config("shift") == ShiftConfig(seed=7)


def test_a_calibration_for_other_detector_settings_is_refused(shift_detector, tmp_path) -> None:
    from tasks.scan.core import load_calibration

    made = _params(tmp_path, {"shift": {"repeats": 2}})
    write_plumbing_calibration(made, tmp_path / "calibration.json", classes=6)
    other = scan_settings(load_params(_params(tmp_path, {"shift": {"repeats": 5}})))
    with pytest.raises(ValueError, match=r"settings.detectors.shift.repeats' is 2 in the "
                                         r"calibration but 5"):
        load_calibration(tmp_path / "calibration.json", other)


def test_the_released_version_1_calibration_still_reads() -> None:
    from tasks.scan.core import load_calibration

    settings = scan_settings(load_params(ROOT / "params.yaml"))
    released = load_calibration(ROOT / "calibration" / "scanner.json", settings)
    assert released.settings == settings.fingerprint()


# --------------------------------------------------------------------------- attacks

@dataclass(frozen=True)
class TintConfig:
    """A toy global attack: every pixel moved towards a colour."""

    strength: float = field(default=0.3, metadata={"gt": 0, "le": 1})
    rate: float = field(default=0.3, metadata={"ge": 0, "le": 1})


@dataclass(frozen=True)
class Tint(Attack):
    """Static poisoning with a whole-image tint; its success is measured with the same tint."""

    strength: float = 0.3
    rate: float = 0.3

    @classmethod
    def from_config(cls, config: TintConfig, target: int, seed: int) -> Tint:
        colour = torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(seed))
        return cls(trigger=colour, target=target, seed=seed, strength=config.strength,
                   rate=config.rate)

    @property
    def static_rate(self) -> float:
        return self.rate

    def apply(self, images, generator):
        x = images.float() / 255
        return ((1 - self.strength) * x + self.strength * self.trigger).mul(255).round().byte()

    def poison_dataset(self, images, labels) -> PoisonedSet:
        gen = torch.Generator().manual_seed(self.seed)
        eligible = (labels != self.target).nonzero().squeeze(1)
        idx = eligible[torch.randperm(len(eligible), generator=gen)[:round(self.rate * len(
            eligible))]].sort().values
        images, labels = images.clone(), labels.clone()
        images[idx], labels[idx] = self.apply(images[idx], gen), self.target
        return PoisonedSet(images, labels, idx)


@pytest.fixture
def tint_attack():
    """The toy attack registered for one test, and gone after it."""
    register("tint", TintConfig)(Tint)
    yield
    del ATTACKS["tint"]


def test_an_attack_defined_in_a_test_builds_a_zoo_model(tint_attack, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from test_zoo import tiny_zoo

    from tasks.zoo import build
    from tasks.zoo.params import load_zoo_params

    entry = {"zoo": "calibration", "arch": "resnet8", "seed": 4, "target": 2,
             "attack": "tint", "strength": 0.5}
    params = load_zoo_params(tiny_zoo(tmp_path, backdoors={"c-tint": entry}))
    assert params.backdoors["c-tint"].attack_config() == TintConfig(strength=0.5, rate=0.3)
    monkeypatch.chdir(tmp_path)
    truth = json.loads(build.run(params, "c-tint").read_text())
    assert truth["backdoored"] and truth["target"] == 2 and truth["base"] is None
    assert truth["attack"] == {"name": "tint", "strength": 0.5, "rate": 0.3}
    # the ASR is the attack's own `success`, on the truth images with its own `apply`
    model, _ = load_model(tmp_path / build.stem_of(params, "c-tint"))
    data = build.load_data(params)
    own = build.attack_of(params.backdoors["c-tint"]).success(
        model, data.truth.images, data.truth.labels, torch.device("cpu"))
    assert truth["asr"] == own
    bad = tiny_zoo(tmp_path, backdoors={"c-tint": {**entry, "strength": 2.0}})
    with pytest.raises(ConfigError, match=r"backdoors.c-tint.strength: Input should be less "
                                          r"than or equal to 1, got 2.0"):
        load_zoo_params(bad)
