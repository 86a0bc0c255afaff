"""`mesa-scan` on models that are not ours (issue 25): a manifest naming a timm architecture, a
Hugging Face / timm folder and an ONNX file are scanned through the model-format seam
(mesa_lib.modelfiles); outside the calibration's coverage they get `uncalibrated`, inside it a
verdict; refusals name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from foreign_fixture import hf_folder, onnx_net
from pipeline_fixture import ROOT, write_plumbing_calibration
from safetensors.torch import save_file

from mesa_lib import modelfiles
from mesa_lib.modelio import Manifest, ModelFileError, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from tasks.common.params import apply_overrides
from tasks.scan.cli import EXIT, main, model_stems

TIMM = "timm:mobilenetv3_small_050"
CHEAP = {"scan.images": 64, "scan.detectors.mask.steps": 4,
         "scan.detectors.mask.batch_size": 8, "base.device": "cpu"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    gen = torch.Generator().manual_seed(0)
    np.savez(root / "reference.npz",
             images=torch.randint(0, 256, (256, 3, 32, 32), generator=gen).to(torch.uint8).numpy(),
             labels=(np.arange(256) % 10), classes=np.array([f"c{k}" for k in range(10)]))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(apply_overrides(raw, CHEAP)))
    calibration = json.loads(write_plumbing_calibration(
        params, root / "plumbing.json", classes=10).read_text())
    for name, archs in (("ours", ["resnet20", "resnet8"]),
                        ("theirs", [TIMM, "onnx"])):
        coverage = {"architectures": archs, "input_shapes": [[3, 32, 32]], "num_classes": [10]}
        (root / f"{name}.json").write_text(
            json.dumps({**calibration, "provenance": {"coverage": coverage}}))
    models = root / "models"
    models.mkdir()
    save_model(build_model(TIMM, 10), models / "timm_pair",
               Manifest(TIMM, 10, tuple(f"c{k}" for k in range(10)), CIFAR10_MEAN, CIFAR10_STD))
    onnx_net(models / "tiny.onnx")
    hf_folder(models / "hf", {"architecture": TIMM.split(":")[1], "num_classes": 10,
                            "pretrained_cfg": {"input_size": [3, 32, 32], "mean": CIFAR10_MEAN,
                                               "std": CIFAR10_STD}})
    return {"root": root, "params": params, "models": models}


def _scan(models: dict[str, Path], calibration: str, *paths: Path,
          capsys: pytest.CaptureFixture) -> tuple[int, list[dict]]:
    code = main([*map(str, paths), "--params", str(models["params"]), "--reference",
                 str(models["root"] / "reference.npz"), "--calibration",
                 str(models["root"] / calibration), "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_folder_of_foreign_models_is_found_and_each_format_loads(models) -> None:
    folder = models["models"]
    assert model_stems([folder]) == [folder / "hf", folder / "timm_pair", folder / "tiny"]
    assert model_stems([folder / "hf"]) == [folder / "hf"]  # the folder is one model
    names = {s.name: modelfiles.format_of(s).name for s in model_stems([folder])}
    assert names == {"hf": "hf-folder", "timm_pair": "safetensors", "tiny": "onnx"}
    x = torch.rand(2, 3, 32, 32)
    for stem in model_stems([folder]):
        model, manifest = modelfiles.load(stem)
        assert model(x).shape == (2, 10) and manifest.input_shape == (3, 32, 32)
    assert modelfiles.main_file(folder / "tiny") == folder / "tiny.onnx"
    assert modelfiles.main_file(folder / "hf") == folder / "hf" / "model.safetensors"


def test_foreign_models_get_no_verdict_outside_the_calibration_and_one_inside(
        models, capsys) -> None:
    stems = model_stems([models["models"]])
    code, records = _scan(models, "ours.json", *stems, capsys=capsys)
    assert code == EXIT["uncalibrated"]
    assert [r["verdict"] for r in records] == ["uncalibrated"] * 3
    assert {r["architecture"] for r in records} == {TIMM, "onnx"}
    assert all(len(r["scores"]["mask"]) == 10 for r in records)
    code, records = _scan(models, "theirs.json", *stems, capsys=capsys)
    assert {r["verdict"] for r in records} <= {"clean", "backdoored"}, records
    assert code in (EXIT["clean"], EXIT["backdoored"])


def test_foreign_files_that_cannot_be_loaded_safely_are_refused_by_name(
        models, tmp_path: Path) -> None:
    no_mean = hf_folder(tmp_path / "nomean", {"architecture": "mobilenetv3_small_050",
                                            "num_classes": 10})
    with pytest.raises(ModelFileError, match=r"nomean/config.json: needs 'input_size'"):
        modelfiles.load(no_mean)
    for name, arch, why in (("huge", "timm:vgg11", r"manifest's architecture 'timm:vgg11'.* "
                                                   r"more than max_parameters"),
                            ("unknown", "hub:evil", r"unknown architecture 'hub:evil'")):
        stem = tmp_path / name  # a weights file of one number: the manifest is refused first
        save_file({"w": torch.zeros(1)}, str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(
            {"architecture": arch, "num_classes": 10, "classes": [str(i) for i in range(10)],
             "mean": [0, 0, 0], "std": [1, 1, 1]}))
        with pytest.raises(ModelFileError, match=rf"{name}.json: {why}"):
            modelfiles.load(stem)
    (tmp_path / "fixed.onnx").write_bytes((models["models"] / "tiny.onnx").read_bytes())
    tiny = tmp_path / "fixed.onnx"  # 314 parameters in 1,521 bytes
    with pytest.raises(ModelFileError, match="fixed.onnx: larger than .* refused unread"):
        modelfiles.load(tiny, max_parameters=10)
    with pytest.raises(ModelFileError, match="fixed.onnx: 314 parameters, more than "
                                             "max_parameters=313"):
        modelfiles.load(tiny, max_parameters=313)
