"""The defence (mesa_lib.defence, tasks.scan.defend, `mesa-scan --repair`): repair every flagged
target against triggers of the recovered geometry, verify on images neither the scan nor the
repair saw, and never pass a repair that left the backdoor working.

Tiny CNNs on the synthetic 16x16 task of backdoor_fixture, backdoored with 4x4 triggers (not the
3x3 the pipeline's MESA is told about): at a fixed corner, at random places, and both at once in
one model (two targets). Each trains in about 10 s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from backdoor_fixture import CPU, Lab, build_lab, synthetic_data
from pipeline_fixture import (
    PLUMBING_ALPHA,
    PLUMBING_FLOOR,
    plumbing_null,
    write_plumbing_calibration,
)

from mesa_lib.calibration import decide, fit
from mesa_lib.defence import DefenceConfig, Outcome, defend, split
from mesa_lib.detectors import ScanSettings, run_detectors, trigger_source
from mesa_lib.distribution import MaskTrigger
from mesa_lib.evaluate import attack_success_rate
from mesa_lib.masksearch import MaskSearchConfig
from mesa_lib.mesa import MesaConfig
from mesa_lib.modelio import load_model
from mesa_lib.repair import RepairConfig
from mesa_lib.triggers import build_trigger, corner_location
from tasks.common.params import apply_overrides, load_params
from tasks.scan.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).parent / "fixtures" / "scan_models"
BW4 = build_trigger("bw", 4, seed=3)
COLOUR4 = build_trigger("random_color", 4, seed=4)
SETTINGS = ScanSettings({"mask": MaskSearchConfig(steps=200, batch_size=16)}, images=256)
REPAIR = RepairConfig(epochs=2, batch_size=64, lr=0.01, stamp_rate=0.5)
CONFIG = DefenceConfig("mesa", REPAIR, MesaConfig(epochs=2, batch_size=64, lr=5e-4), 1024)
RESIDUAL = 0.05  # the true trigger's ASR a repair must get below (observed: 0.0-0.002)


def _lab(**kwargs) -> Lab:
    return build_lab(True, seed=41, n_train=3000, epochs=10, n_defender=2000, **kwargs)


@pytest.fixture(scope="module")
def corner() -> Lab:
    return _lab(trigger=BW4, location="corner", target=0)


@pytest.fixture(scope="module")
def anywhere() -> Lab:
    return _lab(trigger=COLOUR4, location="random", target=2)


@pytest.fixture(scope="module")
def two() -> Lab:
    return _lab(trigger=COLOUR4, location="random", target=2, second=(BW4, "corner", 4))


def true_asr(model: torch.nn.Module, lab: Lab, trigger: torch.Tensor, target: int,
             place: str) -> float:
    """The attacker's own trigger on the held-out images."""
    loc = corner_location((16, 16), trigger.shape[-2:]) if place == "corner" else "random"
    return attack_success_rate(model, lab.test_x, lab.test_y, trigger, target, CPU, loc)


def repaired(lab: Lab, targets: tuple[int, ...], config: DefenceConfig = CONFIG
             ) -> tuple[torch.nn.Module, Outcome]:
    """A copy of the lab's model repaired against the mask search's triggers of `targets`."""
    model = copy.deepcopy(lab.model)
    parts = split(len(lab.defender_x), torch.arange(256), 0.3, 0.2, seed=0)
    sx, sy = lab.defender_x[parts.selection], lab.defender_y[parts.selection]
    found = [trigger_source("mask", model, sx, sy, t, SETTINGS, CPU) for t in targets]
    return model, defend(model, lab.defender_x, lab.defender_y, parts, found, config, CPU)


# --------------------------------------------------------------------------- the data split


def test_verification_images_are_apart_from_the_scan_and_the_repair() -> None:
    scanned = torch.arange(0, 1000, 4)
    parts = split(1000, scanned, verification=0.2, selection=0.1, seed=0)
    ver, sel, rep = parts.verification, parts.selection, parts.repair
    assert len(ver) == 150 and len(sel) == 75 and len(rep) == 1000 - 225
    for a, b in ((ver, sel), (ver, rep), (sel, rep), (ver, scanned), (sel, scanned)):
        assert not torch.isin(a, b).any()
    assert torch.isin(scanned, rep).all()  # what the scan saw may be repaired on, not verified
    with pytest.raises(ValueError, match=r"300 reference images \(256 used by the scan\)"):
        split(300, torch.arange(256), 0.2, 0.1, seed=0)


# --------------------------------------------------------------------------- repairs


def test_a_fixed_place_4x4_backdoor_is_repaired_below_the_residual(corner: Lab) -> None:
    assert true_asr(corner.model, corner, BW4, 0, "corner") >= 0.9
    model, outcome = repaired(corner, (0,))
    (found,) = outcome.found
    assert found.geometry.kind == "patch" and found.geometry.location is not None
    assert outcome.passed, outcome.reason
    assert true_asr(model, corner, BW4, 0, "corner") <= RESIDUAL
    assert outcome.before.accuracy - outcome.after.accuracy <= 0.03


def test_a_random_place_4x4_backdoor_is_repaired_below_the_residual(anywhere: Lab) -> None:
    assert true_asr(anywhere.model, anywhere, COLOUR4, 2, "random") >= 0.9
    model, outcome = repaired(anywhere, (2,))
    assert outcome.passed, outcome.reason
    assert true_asr(model, anywhere, COLOUR4, 2, "random") <= RESIDUAL
    rec = outcome.record()
    assert rec["verdict"] == "clean" and rec["targets"][0]["asr_before"] >= 0.5
    assert json.dumps(rec)  # the audit record is plain JSON


def test_a_two_target_model_gets_both_targets_flagged_and_repaired(two: Lab) -> None:
    assert true_asr(two.model, two, COLOUR4, 2, "random") >= 0.9
    assert true_asr(two.model, two, BW4, 4, "corner") >= 0.9
    calibration = fit(plumbing_null(6), PLUMBING_ALPHA, PLUMBING_FLOOR, SETTINGS.fingerprint())
    verdict = decide(run_detectors(two.model, two.defender_x, two.defender_y, 6, SETTINGS, CPU),
                     calibration)
    assert verdict.status == "backdoored" and set(verdict.targets) == {2, 4}, verdict.reason
    model, outcome = repaired(two, verdict.targets)
    assert outcome.passed, outcome.reason
    assert true_asr(model, two, COLOUR4, 2, "random") <= RESIDUAL
    assert true_asr(model, two, BW4, 4, "corner") <= RESIDUAL


def test_a_repair_that_leaves_the_backdoor_fails_and_says_why(anywhere: Lab) -> None:
    idle = DefenceConfig("unlearn", RepairConfig(epochs=1, batch_size=64, lr=1e-9))
    model, outcome = repaired(anywhere, (2,), idle)
    # still there (BatchNorm statistics move a little even at this learning rate: 0.89)
    assert true_asr(model, anywhere, COLOUR4, 2, "random") >= 0.5
    assert not outcome.passed and outcome.record()["verdict"] == "backdoored"
    assert "repair left" in outcome.reason and "class 2" in outcome.reason


def test_a_repaired_model_must_look_typical_of_clean_ones_not_only_unflagged() -> None:
    """The re-scan's bar: a repaired model whose re-scan is 'clean' at p 0.12 is not cleared
    under a bar of 0.2 (a backdoor the search only partly recovered can leave exactly this),
    and the reason says so; the same re-scan passes a bar of 0.1."""
    from mesa_lib.defence import Measures, judge
    from mesa_lib.verdict import Verdict

    before, after = Measures(0.70, {3: 0.9}), Measures(0.69, {3: 0.02})
    rescan = Verdict("clean", None, 0.12, 0.88, "mask", "no class stands out", {}, {})
    strict = DefenceConfig(min_rescan_p=0.2)
    reason = judge(before, after, rescan, strict)
    assert "does not look like a clean model's (p = 0.120" in reason and ">= 0.2" in reason
    assert judge(before, after, rescan, DefenceConfig(min_rescan_p=0.1)) == ""
    assert strict.record()["min_rescan_p"] == 0.2
    assert "no re-scan" in judge(before, after, None, strict)  # no evidence, no clearance
    # the recovered patch moved to a corner still fires: not cleared, whatever the re-scan says
    moved = Measures(0.69, {3: 0.02}, {3: 0.45})
    assert "45% ASR to the recovered trigger moved" in judge(
        Measures(0.70, {3: 0.9}, {3: 0.5}), moved, rescan, DefenceConfig())


def test_a_second_round_repairs_what_the_first_recovery_missed(corner: Lab) -> None:
    """Rounds: the first recovery is a wrong pattern at the planted place (what the zoo's search
    gave for some models: a trigger, not the planted one); a gentle unlearning of it leaves the
    backdoor working, the repaired model still stands out, and the second round, recovering
    anew from the repaired model, removes it. The verification measures both rounds' triggers
    against the model as it arrived."""
    parts = split(len(corner.defender_x), torch.arange(256), 0.3, 0.2, seed=0)
    sx, sy = corner.defender_x[parts.selection], corner.defender_y[parts.selection]
    real = trigger_source("mask", corner.model, sx, sy, 0, SETTINGS, CPU)
    decoy = dataclasses.replace(real, trigger=MaskTrigger(real.trigger.mask,
                                                          1 - real.trigger.pattern))
    asked = []

    def again(model: torch.nn.Module, n: int) -> list:
        asked.append(n)
        return [trigger_source("mask", model, sx, sy, 0, SETTINGS, CPU)]

    gentle = RepairConfig(epochs=1, batch_size=64, lr=1e-3, stamp_rate=0.5)
    results = {}
    for rounds in (1, 2):
        model = copy.deepcopy(corner.model)
        outcome = defend(model, corner.defender_x, corner.defender_y, parts, [decoy],
                         DefenceConfig("unlearn", gentle, rounds=rounds), CPU, again=again)
        results[rounds] = (true_asr(model, corner, BW4, 0, "corner"), outcome)
    assert asked == [2]  # one round asks nothing; two ask once
    assert results[1][0] >= 0.5, results[1][0]  # the decoy's unlearning missed the backdoor
    asr, outcome = results[2]
    assert asr <= RESIDUAL and outcome.rounds == 2 and len(outcome.found) == 2
    (target,) = outcome.record()["targets"]  # one target, recovered twice
    assert target["target"] == 0 and len(target["again"]) == 1
    # both rounds' triggers verified gone (the tiny model's accuracy is the verification's
    # own business: a cost over the limit fails it, as it should)
    assert target["asr_before"] >= 0.5 and target["asr_after"] <= 0.1, target
    assert "repair left" not in outcome.reason, outcome.reason
    # a next round only when `again` finds something
    model = copy.deepcopy(corner.model)
    quiet = defend(model, corner.defender_x, corner.defender_y, parts, [real],
                   DefenceConfig("unlearn", gentle, rounds=3), CPU, again=lambda m, n: [])
    assert quiet.rounds == 1 and quiet.record()["rounds"] == 1


def test_between_rounds_a_class_stands_out_if_flagged_or_below_the_bar() -> None:
    from mesa_lib.verdict import Verdict
    from tasks.scan.defend import standing_out

    summary = {"mask": {"statistic": 2.0, "p_value": 0.1, "target": 3, "seconds": 1.0}}
    flagged = Verdict("backdoored", 3, 0.01, 0.99, "mask", "", summary, {}, (3, 5))
    assert standing_out(flagged, 0.24) == (3, 5)
    shy = Verdict("clean", None, 0.1, 0.9, "mask", "", summary, {})
    assert standing_out(shy, 0.24) == (3,) and standing_out(shy, 0.05) == ()
    typical = Verdict("clean", None, 0.6, 0.4, "mask", "", summary, {})
    assert standing_out(typical, 0.24) == ()
    # repair.recheck: the targets repaired so far stand out too, each once, after the others
    assert standing_out(typical, 0.24, (7,)) == (7,)
    assert standing_out(shy, 0.24, (7, 3, 7)) == (3, 7)
    assert standing_out(flagged, 0.24, (5, 8)) == (3, 5, 8)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        DefenceConfig(rounds=0)


# --------------------------------------------------------------------------- mesa-scan --repair


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The backdoored fixture model, 2,000 reference images, two params files (the shipped
    repair at 2 epochs; one whose learning rate cannot move the weights) calibrated alike.

    2 epochs, not the shipped budget (5): after 5 the tiny model's re-scan makes class 2 stand
    out against the plumbing calibration's stated null (p = 0.167), which says nothing of a real
    model; the shipped budget is measured on the zoo (tasks/zoo/repair.py)."""
    root = tmp_path_factory.mktemp("mesa-scan-repair")
    images, labels = synthetic_data(2000, 1)
    np.savez(root / "reference.npz", images=images.numpy(), labels=labels.numpy(),
             classes=np.array([f"class{k}" for k in range(6)]))
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(MODELS / f"backdoored{suffix}", root / f"suspect{suffix}")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    scan = {"scan.images": 512, "scan.detectors.mask.steps": 200, "base.device": "cpu",
            "scan.detectors.mask.batch_size": 16, "recover.epochs": 1, "repair.epochs": 2,
            "scan.calibration": str(root / "calibration.json")}
    out = {"root": root}
    for name, extra in (("good", {}), ("idle", {"repair.lr": 1e-9, "repair.method": "unlearn"}),
                        ("recheck", {"repair.method": "unlearn", "repair.rounds": 2,
                                     "repair.recheck": True})):
        out[name] = root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(apply_overrides(raw, {**scan, **extra})))
    write_plumbing_calibration(out["good"], root / "calibration.json", classes=6)
    return out


def _repair(cli: dict[str, Path], params: str, outdir: Path, capsys) -> tuple[int, dict]:
    code = main([str(cli["root"] / "suspect"), "--params", str(cli[params]), "--reference",
                 str(cli["root"] / "reference.npz"), "--format", "json", "--repair",
                 str(outdir)])
    (rec,) = json.loads(capsys.readouterr().out)
    return code, rec


def test_mesa_scan_repair_writes_a_verified_pair(cli, capsys) -> None:
    outdir = cli["root"] / "repaired"
    code, rec = _repair(cli, "good", outdir, capsys)
    assert code == 1 and rec["verdict"] == "backdoored"  # the scanned model's own verdict
    rep = rec["repair"]
    assert rep["verdict"] == "clean" and rep["reason"] == "", rep
    assert rep["files"] == [str(outdir / "suspect.safetensors"), str(outdir / "suspect.json")]
    assert rep["targets"][0]["target"] == 0 and rep["targets"][0]["asr_after"] <= 0.1
    assert {"accuracy_before", "accuracy_after", "settings", "images", "rescan"} <= set(rep)
    model, manifest = load_model(outdir / "suspect")
    assert manifest.extra["repaired_from"] == "suspect"


def test_between_rounds_each_class_is_searched_by_the_detector_it_stands_out_by(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """recover_again with the scan stubbed: a class the re-scan makes stand out is searched by
    the re-scan's detector; a repaired target added by recheck by the detector that found it,
    and a target first found in a later round is rechecked in the rounds after it."""
    from types import SimpleNamespace

    from mesa_lib.verdict import Verdict
    from tasks.scan import defend

    summary = {"mask": {"statistic": 2.0, "p_value": 0.1, "target": 3, "seconds": 1.0}}
    verdicts = iter([Verdict("clean", None, 0.1, 0.9, "mask", "", summary, {}),
                     Verdict("clean", None, 0.6, 0.4, "mask", "", summary, {})])
    monkeypatch.setattr(defend, "measure_chunk", lambda *a, **k: None)
    monkeypatch.setattr(defend, "verdict_of", lambda chunks, cal: next(verdicts))
    searched = []

    def source(detector, model, x, y, target, settings, device):
        searched.append((target, detector))
        return SimpleNamespace(target=target, detector=detector)

    monkeypatch.setattr(defend, "trigger_source", source)
    ref = SimpleNamespace(images=torch.zeros(4, 3, 8, 8), labels=torch.zeros(4, dtype=torch.long),
                          classes=[str(k) for k in range(6)])
    prepared = SimpleNamespace(found=[SimpleNamespace(target=0, detector="transform")],
                               splits=SimpleNamespace(selection=torch.arange(2)))
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"repair": params.repair.model_copy(
        update={"recheck": True, "again_p": 0.24})})
    again = defend.recover_again(ref, prepared, params, None, CPU)
    assert [(r.target, r.detector) for r in again(None, 1)] == [(3, "mask"), (0, "transform")]
    again(None, 2)  # class 3, first found in round 1, is rechecked too
    assert searched[2:] == [(0, "transform"), (3, "mask")]


def test_with_recheck_a_second_round_searches_the_repaired_target_again(cli, capsys) -> None:
    """repair.recheck: after the first round the repaired target's trigger is recovered anew
    from the repaired model (by the detector that found it), whatever the re-scan says, and the
    second round repairs against both; the record says so."""
    code, rec = _repair(cli, "recheck", cli["root"] / "rechecked", capsys)
    rep = rec["repair"]
    assert rep["rounds"] == 2 and rep["settings"]["recheck"] is True, rep
    (first,) = rep["targets"]
    assert first["target"] == 0 and [a["detector"] for a in first["again"]] == ["mask"]
    # (not its verdict: after four epochs the tiny model's re-scan makes class 2 stand out
    # against the plumbing calibration, as the fixture's docstring says of five)
    assert first["asr_after"] <= 0.1, rep


def test_mesa_scan_repair_reports_a_failed_repair_and_never_overwrites(cli, capsys) -> None:
    code, rec = _repair(cli, "idle", cli["root"] / "idle", capsys)
    rep = rec["repair"]
    assert code == 1 and rep["verdict"] == "backdoored"
    # the recovered trigger's own ASR may fall (BatchNorm statistics move even at this learning
    # rate), but the re-scan on the verification images still finds the backdoor's class
    assert "class 0" in rep["reason"] or "finds a backdoor (target 0" in rep["reason"], rep
    code, rec = _repair(cli, "idle", cli["root"], capsys)
    assert "would overwrite the model itself" in rec["repair"]["error"]
