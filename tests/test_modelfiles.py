"""Model files are named, grouped and found in one place (mesa_lib.modelfiles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesa_lib import modelfiles
from mesa_lib.modelfiles import ModelFormat


def test_a_model_is_a_stem_and_the_files_of_its_format(tmp_path: Path) -> None:
    for given in ("a/b", "a/b.safetensors", "a/b.json"):
        assert modelfiles.stem(given) == Path("a/b")
        assert modelfiles.files(given) == (Path("a/b.safetensors"), Path("a/b.json"))
    assert modelfiles.stem("a/b.c.safetensors") == Path("a/b.c")  # dots in the stem stay
    assert modelfiles.stem(".json") == Path(".json")  # a bare suffix is no model
    assert modelfiles.role("x.safetensors") == "weights" and modelfiles.role("x.json") == "manifest"
    assert modelfiles.role("x.pt") is None
    assert modelfiles.main_file("x.json") == Path("x.safetensors")


def test_a_folder_is_searched_for_main_files_only(tmp_path: Path) -> None:
    for name in ("b.safetensors", "b.json", "a.safetensors", "lonely.json", "c.pt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.safetensors").write_bytes(b"")
    assert modelfiles.find(tmp_path) == [tmp_path / "a", tmp_path / "b"]


def test_a_registered_format_is_known_everywhere(tmp_path: Path) -> None:
    fmt = modelfiles.register_format(ModelFormat("toy", ((".toyw", "weights"),)))
    try:
        (tmp_path / "m.toyw").write_bytes(b"")
        assert modelfiles.find(tmp_path) == [tmp_path / "m"]
        assert modelfiles.role("m.toyw") == "weights" and modelfiles.stem("m.toyw") == Path("m")
        assert fmt.paths(Path("m")) == (Path("m.toyw"),)
        assert modelfiles.format_of(tmp_path / "m") == fmt  # its main file is there
        with pytest.raises(ValueError, match=r"m: no reader is registered for toy models"):
            modelfiles.load(tmp_path / "m")
        modelfiles.register_reader(fmt, lambda path, **kw: (f"model of {path.name}", kw))
        assert modelfiles.load(tmp_path / "m.toyw", map_location="cpu") == (
            "model of m.toyw", {"map_location": "cpu"})
    finally:
        del modelfiles.FORMATS["toy"]
        modelfiles.READERS.pop("toy", None)


def test_our_own_models_load_through_the_registry() -> None:
    fixture = Path(__file__).parent / "fixtures" / "scan_models" / "clean"
    assert modelfiles.format_of(fixture) == modelfiles.SAFETENSORS
    model, manifest = modelfiles.load(fixture)
    assert manifest.num_classes == 6 and not model.training
