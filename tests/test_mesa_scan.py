"""`mesa-scan`: exit codes and JSON fields on a clean, a backdoored and a hostile file; names
with control characters printed escaped; errors named. Models: tests/fixtures/scan_models."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from backdoor_fixture import TARGET, synthetic_data
from pipeline_fixture import ROOT, write_plumbing_calibration

from tasks.common.params import apply_overrides
from tasks.scan.cli import EXIT, main, model_stems, text_line

MODELS = Path(__file__).parent / "fixtures" / "scan_models"
SCAN = {"scan.images": 1024, "scan.detectors.mask.steps": 200,
        "scan.detectors.mask.batch_size": 16, "base.device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mesa-scan")
    images, labels = synthetic_data(1024, 1)
    np.savez(root / "reference.npz", images=images.numpy(), labels=labels.numpy(),
             classes=np.array([f"class{k}" for k in range(6)]))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(
        raw, {**SCAN, "scan.calibration": str(root / "calibration.json")})))
    write_plumbing_calibration(params, root / "calibration.json", classes=6)
    for name in ("clean", "backdoored"):
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(MODELS / f"{name}{suffix}", root / f"{name}{suffix}")
    (root / "evil.safetensors").write_bytes(pickle.dumps({"not": "weights"}))
    shutil.copyfile(MODELS / "clean.json", root / "evil.json")
    odd = root / "odd\nname\x1b[2J"
    odd.with_name(odd.name + ".safetensors").write_bytes(b"")
    shutil.copyfile(MODELS / "clean.json", odd.with_name(odd.name + ".json"))
    return {"root": root, "params": params, "reference": root / "reference.npz", "odd": odd}


def _run(setup: dict[str, Path], *paths: Path, fmt: str = "json",
         capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([*map(str, paths), "--params", str(setup["params"]), "--reference",
                 str(setup["reference"]), "--format", fmt])
    return code, capsys.readouterr().out


def test_a_clean_model_exits_0_with_every_json_field(setup, capsys) -> None:
    code, out = _run(setup, setup["root"] / "clean.safetensors", capsys=capsys)
    (rec,) = json.loads(out)
    assert code == 0 and rec["verdict"] == "clean" and rec["target"] is None
    assert set(rec) >= {"verdict", "target", "confidence", "p_value", "reason", "scores",
                        "detector", "detectors", "seconds", "model"}
    assert 0 < rec["p_value"] <= 1 and rec["confidence"] == pytest.approx(1 - rec["p_value"])
    assert set(rec["scores"]) == {"mask"} and len(rec["scores"]["mask"]) == 6
    assert rec["seconds"]["total"] > 0


def test_a_backdoored_model_exits_1_naming_its_target(setup, capsys) -> None:
    code, out = _run(setup, setup["root"] / "backdoored", fmt="text", capsys=capsys)
    assert code == EXIT["backdoored"] == 1
    assert out.startswith("BACKDOORED") and f"target {TARGET}," in out and "p = " in out


def test_a_hostile_file_exits_2_and_names_are_escaped(setup, capsys) -> None:
    code, out = _run(setup, setup["root"] / "evil.json", setup["odd"], capsys=capsys)
    evil, odd = json.loads(out)
    assert code == 2 and evil["verdict"] == odd["verdict"] == "rejected"
    assert "refusing to load a pickle" in evil["reason"] and "evil" in evil["reason"]
    assert "\\n" in odd["model"] and "\n" not in odd["model"] and "\x1b" not in odd["reason"]
    code, text = _run(setup, setup["odd"], fmt="text", capsys=capsys)
    assert code == 2 and text.count("\n") == 1 and "\x1b" not in text  # one line, no escapes


def test_errors_exit_3_and_name_the_cause(setup, capsys, tmp_path: Path) -> None:
    code = main([str(setup["root"] / "clean"), "--params", str(setup["params"]),
                 "--reference", str(setup["reference"]),
                 "--calibration", str(tmp_path / "none.json")])
    assert code == 3 and "none.json: calibration file is missing" in capsys.readouterr().err
    code = main([str(setup["root"] / "clean"), "--params", str(setup["params"]),
                 "--reference", str(tmp_path / "missing.npz")])
    assert code == 3 and "missing.npz" in capsys.readouterr().err


def test_folders_are_expanded_once_in_order(setup) -> None:
    root = setup["root"]
    stems = model_stems([root, root / "clean.json"])
    assert stems[:2] == [root / "backdoored", root / "clean"] and len(set(stems)) == len(stems)


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "mesa-scan"
    assert script.exists(), "pip install -e . installs the mesa-scan console script"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--reference" in done.stdout


def test_a_folder_holding_no_model_is_an_error_not_clean(setup, capsys) -> None:
    """A CI gate must not read "nothing scanned" as clean (exit 0)."""
    empty = setup["root"] / "empty"
    empty.mkdir(exist_ok=True)
    pickles = setup["root"] / "pickles"
    pickles.mkdir(exist_ok=True)
    (pickles / "model.pt").write_bytes(b"not loaded")
    code, out = _run(setup, empty, pickles, capsys=capsys)
    first, second = json.loads(out)
    assert code == EXIT["error"] == 3
    assert first["verdict"] == "error" and "no model in this folder" in first["reason"]
    assert "(empty)" in first["reason"] and "model.pt" in second["reason"]


def test_a_model_outside_the_calibration_gets_no_verdict(setup, capsys, tmp_path: Path) -> None:
    """Another architecture or input shape than the calibration's clean models: `uncalibrated`,
    exit 4, scores still shown, no repair; a calibration covering it gives the verdict back."""
    raw = json.loads((setup["root"] / "calibration.json").read_text())

    def scan(coverage: dict, fmt: str = "json", *repair: str) -> tuple[int, str]:
        path = tmp_path / "calibration.json"
        path.write_text(json.dumps({**raw, "provenance": {"coverage": coverage}}))
        code = main([str(setup["root"] / "backdoored"), "--params", str(setup["params"]),
                     "--reference", str(setup["reference"]), "--calibration", str(path),
                     "--format", fmt, *repair])
        return code, capsys.readouterr().out

    code, out = scan({"architectures": ["resnet20"], "input_shapes": [[3, 32, 32]]}, "json",
                     "--repair", str(tmp_path / "repaired"))
    (rec,) = json.loads(out)
    assert code == EXIT["uncalibrated"] == 4 and rec["verdict"] == "uncalibrated"
    assert "architecture 'resnet8' is not among the calibration's ['resnet20']" in rec["reason"]
    assert "input shape" in rec["reason"]  # the fixture's 16x16 images are outside it too
    assert rec["target"] is None and len(rec["scores"]["mask"]) == 6 and "repair" not in rec
    assert not (tmp_path / "repaired").exists()
    assert text_line(rec).startswith("UNCALIBRATED") and "\n" not in text_line(rec)
    code, out = scan({"architectures": ["resnet8"], "num_classes": [6]})
    assert code == EXIT["backdoored"] and json.loads(out)[0]["target"] == TARGET
