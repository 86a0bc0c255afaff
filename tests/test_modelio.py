"""Tests for mesa_lib.modelio: round trip and refusal of every unsafe or inconsistent file."""

import hashlib
import json
import os
import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mesa_lib.modelio as modelio
from mesa_lib.modelio import (
    MAX_PARAMETERS,
    Manifest,
    ModelFileError,
    load_manifest,
    load_model,
    model_fingerprint,
    save_model,
)
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model

CLASSES = tuple(f"c{i}" for i in range(10))


class Evil:
    """Unpickling this object creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _manifest(**overrides: object) -> Manifest:
    base = dict(
        architecture="resnet8", num_classes=10, classes=CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    return Manifest(**{**base, **overrides})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid resnet8 model file pair; returns the .safetensors path."""
    torch.manual_seed(0)
    manifest = _manifest(extra={"attack": "badnets", "seed": 1}, data_hash="abc")
    return save_model(build_model("resnet8"), tmp_path / "net", manifest)


def _refused(path: Path, match: str) -> ModelFileError:
    with pytest.raises(ModelFileError, match=match) as err:
        load_model(path)
    assert path.name in str(err.value) or path.with_suffix(".json").name in str(err.value)
    return err.value


def _edit_manifest(weights: Path, edit: Callable[[dict], object]) -> None:
    mpath = weights.with_suffix(".json")
    raw = json.loads(mpath.read_text())
    edit(raw)
    mpath.write_text(json.dumps(raw))


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", width=2).eval()
    manifest = _manifest(arch_kwargs={"width": 2}, extra={"epochs": 3, "attack": "badnets"})
    wpath = save_model(model, tmp_path / "m.safetensors", manifest)
    assert wpath == tmp_path / "m.safetensors" and (tmp_path / "m.json").is_file()
    loaded, got = load_model(tmp_path / "m")
    assert got == manifest and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert load_manifest(tmp_path / "m.json") == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path: Path) -> None:
    """ResNet-18's safetensors header is 0x2b80 bytes long: its first byte is pickle's 0x80."""
    model = build_model("resnet18").eval()
    wpath = save_model(model, tmp_path / "r18", _manifest(architecture="resnet18"))
    assert wpath.read_bytes()[:1] == b"\x80"
    loaded, _ = load_model(wpath)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values(), strict=True))


def test_a_file_dressed_as_a_safetensors_header_is_still_refused(saved: Path,
                                                                  tmp_path: Path) -> None:
    """0x80 then zeros then '{' passes the sniff; safetensors' own parser must then refuse it."""
    marker = tmp_path / "pwned"
    saved.write_bytes((0x80).to_bytes(8, "little") + b"{" + pickle.dumps(Evil(marker)).ljust(127))
    _refused(saved, "corrupt or truncated safetensors file")
    assert not marker.exists()


def test_fingerprint_is_sha256(saved: Path) -> None:
    assert model_fingerprint(saved) == hashlib.sha256(saved.read_bytes()).hexdigest()


def test_payload_is_live(tmp_path: Path) -> None:
    """Control: the malicious pickle really runs code when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(marker)))  # deliberate: proves the payload works
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_refuses_malicious_pickle(saved: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    with saved.open("wb") as fh:
        if writer == "pickle":
            pickle.dump(Evil(marker), fh)
        else:
            torch.save(Evil(marker), fh)
    _refused(saved, "refusing to load a pickle.*only safetensors accepted")
    assert not marker.exists()


def test_refuses_old_pickle_protocol(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    saved.write_bytes(pickle.dumps(Evil(marker), protocol=0))
    _refused(saved, "refusing to load a pickle")
    assert not marker.exists()


def test_refuses_zero_byte(saved: Path) -> None:
    saved.write_bytes(b"")
    _refused(saved, "empty")


@pytest.mark.parametrize("keep", [4, 300, 0.5])
def test_refuses_truncated(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(keep if keep >= 1 else len(data) * keep)])
    _refused(saved, "truncated")


def test_refuses_num_classes_shape_mismatch(saved: Path) -> None:
    classes = [f"c{i}" for i in range(100)]
    _edit_manifest(saved, lambda m: m.update(num_classes=100, classes=classes))
    err = _refused(saved, "do not match")
    assert "fc.weight" in str(err)


def test_refuses_width_mismatch(saved: Path) -> None:
    _edit_manifest(saved, lambda m: m.update(arch_kwargs={"width": 2}))
    _refused(saved, "conv1.weight")


@pytest.fixture
def build_devices(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the device every ``build_model`` call inside modelio allocates on."""
    devices: list[str] = []

    def spy(*args: object, **kwargs: object) -> torch.nn.Module:
        devices.append(torch.empty(0).device.type)
        return build_model(*args, **kwargs)

    monkeypatch.setattr(modelio, "build_model", spy)
    return devices


def test_refuses_huge_width_before_allocating(saved: Path, build_devices: list[str]) -> None:
    _edit_manifest(saved, lambda m: m.update(arch_kwargs={"width": 10_000}))
    err = _refused(saved, "max_parameters=")
    assert "'width': 10000" in str(err) and saved.with_suffix(".json").name in str(err)
    assert build_devices == ["meta"]  # sized on the meta device, never built for real


def test_refuses_huge_num_classes(saved: Path, build_devices: list[str]) -> None:
    classes = [f"c{i}" for i in range(20_000)]
    _edit_manifest(saved, lambda m: m.update(num_classes=len(classes), classes=classes))
    with pytest.raises(ModelFileError, match="num_classes 20000.*max_parameters=1000000") as err:
        load_model(saved, max_parameters=1_000_000)
    assert "fc.weight [20000, 64]" in str(err.value) and build_devices == ["meta"]


@pytest.mark.parametrize("kwargs", [{"width": 1.5}, {"width": 10**30}, {"depth": 3}])
def test_refuses_unbuildable_arch_kwargs(saved: Path, kwargs: dict) -> None:
    _edit_manifest(saved, lambda m: m.update(arch_kwargs=kwargs))
    err = _refused(saved, "cannot build the manifest's architecture 'resnet8'")
    assert f"arch_kwargs {kwargs}" in str(err)


def test_refuses_huge_manifest(saved: Path) -> None:
    _edit_manifest(saved, lambda m: m.update(data_hash="x" * (2 << 20)))
    _refused(saved, "manifest is larger than")


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18"])
@pytest.mark.parametrize("classes", [10, 100])
def test_default_limit_admits_resnet18(arch: str, classes: int) -> None:
    with torch.device("meta"):
        model = build_model(arch, classes)
    assert sum(v.numel() for v in model.state_dict().values()) < MAX_PARAMETERS / 5


def test_refuses_nan_weights(tmp_path: Path) -> None:
    model = build_model("resnet8")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    wpath = save_model(model, tmp_path / "nan", _manifest())
    err = _refused(wpath, "NaN")
    assert "fc.weight" in str(err)


def test_refuses_unknown_architecture(saved: Path) -> None:
    _edit_manifest(saved, lambda m: m.update(architecture="vgg99"))
    _refused(saved, "unknown architecture 'vgg99'")


def test_refuses_missing_manifest(saved: Path) -> None:
    saved.with_suffix(".json").unlink()
    _refused(saved, "manifest file is missing")


def test_refuses_missing_weights(saved: Path) -> None:
    saved.unlink()
    _refused(saved, "weights file is missing")


def test_refuses_malformed_json(saved: Path) -> None:
    saved.with_suffix(".json").write_text('{"architecture": "resnet8",')
    _refused(saved, "not valid JSON")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(backdoor=True), "unknown keys \\['backdoor'\\]"),
        (lambda m: m.pop("classes"), "missing keys \\['classes'\\]"),
        (lambda m: m.update(num_classes="10"), "'num_classes' must be"),
        (lambda m: m.update(mean=[0.5, 0.5]), "'mean' must be"),
        (lambda m: m.update(extra={"k": [1]}), "'extra' must be"),
        (lambda m: m.update(format_version=2), "'format_version' must be"),
        (lambda m: m.update(classes=["a", "b"]), "num_classes is 10 but 2"),
    ],
)
def test_refuses_bad_manifest(saved: Path, edit: Callable[[dict], object], match: str) -> None:
    _edit_manifest(saved, edit)
    _refused(saved, match)


def test_refuses_oversize_file(saved: Path) -> None:
    size = os.path.getsize(saved)
    with saved.open("ab") as fh:
        fh.write(b"\0" * size * 2)
    _refused(saved, "more than 1.5 x")


def test_refuses_mismatched_normalize(saved: Path) -> None:
    _edit_manifest(saved, lambda m: m.update(mean=[0.5, 0.5, 0.5]))
    _refused(saved, "normalize.mean")


def test_save_rejects_inconsistent_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="num_classes is 10 but 3"):
        save_model(build_model("resnet8"), tmp_path / "x", _manifest(classes=("a", "b", "c")))
    with pytest.raises(ModelFileError, match="do not match|does not match"):
        save_model(build_model("resnet8", width=2), tmp_path / "x", _manifest())
    assert list(tmp_path.iterdir()) == []


def test_refuses_junk_bytes(saved: Path) -> None:
    saved.write_bytes(b"\0" * 100)
    _refused(saved, "implausible safetensors header")
