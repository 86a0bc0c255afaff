"""Model files: which files make one model, their names and roles, and how they are found.

A model on disk is a *stem* (``a/b``) and the files of its format:

- ``safetensors``: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (manifest), read and written
  safely by mesa_lib.modelio; the manifest's architecture is one of ours or a torchvision / timm
  registry name;
- ``onnx``: ``<stem>.onnx``, read by mesa_lib.foreign (operator allow-list, onnx2torch);
- ``hf-folder``: a folder ``<stem>/`` holding ``config.json`` + ``model.safetensors`` (Hugging
  Face / timm), read by mesa_lib.foreign.
 Everything that names, groups, copies, signs or discovers model files (the
scanner's CLI, its drop folder and registry discovery, signing, the pipeline's catalog) asks this
module, and the scanner loads a model through `load`, which hands it to its format's reader: a
new format is one `ModelFormat` registered here and its reader (`register_reader`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFormat:
    """The files of one model in a format.

    Attributes:
        name: the format's name.
        files: (suffix, role) of each file, the main one (the weights) first.
    """

    name: str
    files: tuple[tuple[str, str], ...]

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every file suffix of the format, the main one first."""
        return tuple(suffix for suffix, _ in self.files)

    def paths(self, stem: Path) -> tuple[Path, ...]:
        """The files of the model `stem`, the main one first."""
        stem = Path(stem)
        return tuple(stem.with_name(stem.name + suffix) for suffix in self.suffixes)

    def find(self, folder: Path) -> set[Path]:
        """Stems of this format's models in `folder` (not below it)."""
        return {stem(p) for p in folder.glob(f"*{self.suffixes[0]}") if p.is_file()}


@dataclass(frozen=True)
class FolderFormat(ModelFormat):
    """A model that is a folder of fixed file names; its stem is the folder."""

    def paths(self, stem: Path) -> tuple[Path, ...]:
        """The files inside the folder `stem`, the main one first."""
        return tuple(Path(stem) / name for name in self.suffixes)

    def holds(self, folder: Path) -> bool:
        """`folder` is a model of this format (every file there, and no manifest of ours
        beside its weights: `model.safetensors` + `model.json` is our own pair)."""
        main = Path(folder) / self.suffixes[0]
        return all(p.is_file() for p in self.paths(folder)) and \
            not SAFETENSORS.paths(stem(main))[1].is_file()

    def find(self, folder: Path) -> set[Path]:
        """Subfolders of `folder` that are models of this format."""
        return {p for p in folder.iterdir() if p.is_dir() and self.holds(p)}


FORMATS: dict[str, ModelFormat] = {}


def register_format(fmt: ModelFormat) -> ModelFormat:
    """Add a format to `FORMATS`."""
    FORMATS[fmt.name] = fmt
    return fmt


SAFETENSORS = register_format(
    ModelFormat("safetensors", ((".safetensors", "weights"), (".json", "manifest"))))
WEIGHTS_SUFFIX, MANIFEST_SUFFIX = SAFETENSORS.suffixes
ONNX = register_format(ModelFormat("onnx", ((".onnx", "weights"),)))
HF_FOLDER = register_format(
    FolderFormat("hf-folder", (("model.safetensors", "weights"), ("config.json", "config"))))


def suffixes() -> tuple[str, ...]:
    """Every suffix of every registered file format (a folder format's names are not ones)."""
    return tuple(s for fmt in _file_formats() for s in fmt.suffixes)


def _file_formats() -> list[ModelFormat]:
    return [f for f in FORMATS.values() if not isinstance(f, FolderFormat)]


def role(path: Path | str) -> str | None:
    """"weights", "manifest", ... for a model file's name; None for any other file."""
    name = Path(path).name
    for fmt in _file_formats():
        for suffix, kind in fmt.files:
            if name.endswith(suffix) and len(name) > len(suffix):
                return kind
    return None


def stem(path: Path | str) -> Path:
    """``a/b.safetensors``, ``a/b.json`` and ``a/b`` all -> ``a/b``."""
    path = Path(path)
    for suffix in suffixes():
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def files(path: Path | str, fmt: ModelFormat | None = None) -> tuple[Path, ...]:
    """The files of the model at `path` (a stem or any of its files), the main one first
    (`fmt`: default the model's own, `format_of`)."""
    return (fmt or format_of(path)).paths(stem(path))


def main_file(path: Path | str, fmt: ModelFormat | None = None) -> Path:
    """The model's main file (its weights)."""
    return files(path, fmt)[0]


def find(folder: Path | str) -> list[Path]:
    """Stems of the models in `folder` (not below it, except the folders that are models),
    sorted; `[folder]` if the folder is itself a model."""
    folder = Path(folder)
    if any(isinstance(f, FolderFormat) and f.holds(folder) for f in FORMATS.values()):
        return [folder]
    return sorted({s for fmt in FORMATS.values() for s in fmt.find(folder)})


Reader = Callable[..., tuple[Any, Any]]
"""(model path, map_location=..., **limits) -> (nn.Module in eval mode, its Manifest)."""
READERS: dict[str, Reader] = {}


def register_reader(fmt: ModelFormat, reader: Reader) -> None:
    """Make `reader` load the models of `fmt`."""
    READERS[fmt.name] = reader


def format_of(path: Path | str) -> ModelFormat:
    """The format of the model at `path`: the one whose file it names, else the one whose main
    file exists beside the stem, else safetensors (whose reader then names the missing file)."""
    name = Path(path).name
    for fmt in _file_formats():
        if any(name.endswith(s) and len(name) > len(s) for s in fmt.suffixes):
            return fmt
    for fmt in FORMATS.values():
        if isinstance(fmt, FolderFormat) and fmt.holds(Path(path)):
            return fmt
        if not isinstance(fmt, FolderFormat) and fmt.paths(stem(path))[0].is_file():
            return fmt
    return SAFETENSORS


def load(path: Path | str, **kwargs: Any) -> tuple[Any, Any]:
    """Load the model at `path` with its format's reader: (model, manifest)."""
    from mesa_lib import foreign, modelio  # noqa: F401 - they register their readers

    fmt = format_of(path)
    if fmt.name not in READERS:
        raise ValueError(f"{path}: no reader is registered for {fmt.name} models")
    return READERS[fmt.name](Path(path), **kwargs)
