"""A tiny pipeline project for the tests: synthetic CIFAR-like archive, tiny params, temp stores.

`make_project(tmp)` makes `tmp` a DVC repository (no git) holding a copy of dvc.yaml, writes a
tar.gz image-folder archive of 32x32 PNGs (`train/<class>/*.png`, `test/<class>/*.png`, 10
classes) into `tmp/data/`, and writes `tmp/params.yaml` with TINY_OVERRIDES applied, so every
stage runs in seconds on CPU.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.io import encode_png

from tasks.common.params import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")

TINY_OVERRIDES: dict[str, Any] = {
    "base.device": "cpu",
    "data.n_train": 0, "data.n_defender": 80,
    "validate.data_docs": True,
    "poison.settings.badnets.rate": 0.2, "validate.poison_rate_tolerance": 0.02,
    "train.epochs": 1, "train.batch_size": 32, "train.model": "resnet8",
    "recover.epochs": 1, "recover.batch_size": 16, "recover.n_images": 0,
    "recover.hidden": 32, "recover.mine_hidden": 32, "recover.grid_samples": 8,
    "baseline.starts": 2, "baseline.epochs": 1, "baseline.batch_size": 16,
    "baseline.n_images": 0, "baseline.repair_epochs": 1,
    "repair.epochs": 1, "repair.batch_size": 16,
    # 80 defender images, 20 scanned: the repair's verification and selection parts need >= 20
    "repair.verification": 0.35, "repair.selection": 0.35,
    "evaluate.variants": 2,
    "scan.images": 20, "scan.detectors.mask.steps": 8, "scan.detectors.mask.batch_size": 8,
    "scan.calibration": "calibration.json",
}
# Tests of plumbing (flows, tags, claims) calibrate on a stated null: five clean "models" whose
# class scores are drawn uniformly in +-0.3 (the spread of the clean fixture's mask scores), at
# alpha 0.2, not on real clean models. The statistics are tested in tests/test_scanner.py, and
# the real calibration is calibration/scanner.json, fitted on the zoo.
PLUMBING_ALPHA, PLUMBING_FLOOR = 0.2, 0.1


def plumbing_null(classes: int, detectors: tuple[str, ...] = ("mask",), models: int = 5,
                  spread: float = 0.3) -> list[dict[str, dict[int, float]]]:
    """Seeded class scores of `models` stated clean models, for each of `detectors`."""
    rng = random.Random(0)
    return [{d: {k: rng.uniform(-spread, spread) for k in range(classes)} for d in detectors}
            for _ in range(models)]


def write_plumbing_calibration(params_path: Path, target: Path, classes: int = 10,
                               spread: float = 0.3, floor: float = PLUMBING_FLOOR) -> Path:
    """A calibration for exactly the scan settings of `params_path`, on `plumbing_null`
    (a tiny `spread` and `floor`: a null so tight that a tiny model is flagged)."""
    from mesa_lib.calibration import fit
    from tasks.common.configs import scan_settings
    from tasks.common.params import load_params

    settings = scan_settings(load_params(params_path))
    fitted = fit(plumbing_null(classes, settings.names, spread=spread), PLUMBING_ALPHA, floor,
                 settings.fingerprint(), {"zoo": "plumbing test (stated null)"})
    target.write_text(json.dumps(fitted.to_dict()))
    return target


def _png(label: int, index: int) -> bytes:
    g = torch.Generator().manual_seed(1000 * label + index)
    tint = torch.tensor([label * 25, 255 - label * 25, (label * 70) % 256]).view(3, 1, 1)
    image = (0.5 * tint + 0.5 * torch.randint(0, 256, (3, 32, 32), generator=g)).to(torch.uint8)
    return bytes(encode_png(image).numpy())


def write_archive(path: Path, train_per_class: int = 12, test_per_class: int = 10,
                  counts: Mapping[str, int] | None = None) -> Path:
    """A tar.gz image-folder archive; `counts` overrides the train count of some classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for split, per in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(CLASSES):
                n = (counts or {}).get(name, per) if split == "train" else per
                for i in range(n):
                    blob = _png(label, i + (0 if split == "train" else 500))
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.png")
                    info.size = len(blob)
                    archive.addfile(info, io.BytesIO(blob))
    return path


def make_project(tmp: Path, overrides: Mapping[str, Any] | None = None,
                 counts: Mapping[str, int] | None = None) -> Path:
    """A project folder with dvc.yaml, tiny params.yaml and data/tiny.tar.gz; returns it."""
    from dvc.repo import Repo

    tmp.mkdir(parents=True, exist_ok=True)
    Repo.init(str(tmp), no_scm=True).close()  # the stages read their graph through DVC
    (tmp / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = apply_overrides(raw, {**TINY_OVERRIDES, **(overrides or {})})
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_plumbing_calibration(tmp / "params.yaml", tmp / "calibration.json")
    write_archive(tmp / "data" / "tiny.tar.gz", counts=counts)
    return tmp


def write_scan_params(root: Path, overrides: dict[str, Any]) -> Path:
    """The project's params with the scan's folders under `root`, `overrides` applied, and a
    plumbing calibration for exactly those scan settings (6 classes); the params path."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = {"base.device": "cpu", "scan.reference": str(root / "reference.npz"),
            "scan.drop_folder": str(root / "drop"), "scan.state_folder": str(root / "state"),
            "scan.settle_s": 0, "scan.grid_samples": 4,
            "scan.calibration": str(root / "calibration.json")}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, {**base, **overrides})))
    write_plumbing_calibration(path, root / "calibration.json", classes=6)
    return path
