"""Safe model files: ``<stem>.safetensors`` weights plus a ``<stem>.json`` manifest.

Backdoor defence handles models from untrusted parties, and a pickle (``torch.save``) file runs
arbitrary code when loaded. This module therefore never unpickles: only safetensors' parser reads a
weights file. It sniffs the first bytes, names a pickle or zip archive when it refuses one (a valid
safetensors header can begin with pickle's 0x80, so the header is read first), sizes the manifest's
architecture on the meta device (shapes only, no memory) so that a hostile manifest claiming a huge
width or class count is refused before a single real tensor is allocated: its tensors must total at
most ``max_parameters`` elements, and the file may not be far larger than they imply. It then reads
the safetensors header to compare every tensor name, shape and dtype with that plan, and only then
loads the data (refusing NaN/Inf) and builds the real model. Every problem raises
:class:`ModelFileError` naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mesa_lib import modelfiles
from mesa_lib.fileio import atomic_write
from mesa_lib.models import FOREIGN_REGISTRIES, MODELS, build_model, is_foreign

FORMAT_VERSION = 1
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_MAX_MANIFEST_BYTES = 1 << 20  # ~100k class names; a larger manifest is refused unread
# Default cap on the tensor elements (parameters and buffers) a manifest may imply: ResNet-18 has
# about 11.2M at 10 or 100 classes; 100M float32 elements are 400 MB.
MAX_PARAMETERS = 100_000_000
_HEADER_BYTES_PER_TENSOR = 256  # generous allowance for one header entry
_PICKLE_MAGIC = {b"PK\x03\x04": "zip archive as written by torch.save", b"\x80": "pickle stream"}
_MAX_LISTED = 5

Scalar = str | int | float | bool


class ModelFileError(ValueError):
    """A model file or manifest that is missing, malformed, unsafe or inconsistent."""


@dataclass(frozen=True)
class Manifest:
    """What a weights file holds and where it came from.

    Attributes:
        architecture: Key of :data:`mesa_lib.models.MODELS`, or ``torchvision:<name>`` /
            ``timm:<name>`` (built by that library, mesa_lib.foreign).
        num_classes: Number of output logits; equals ``len(classes)``.
        classes: Class names, index i = logit i.
        mean: Per-channel pixel mean of the model's internal Normalize.
        std: Per-channel pixel std of the model's internal Normalize.
        input_shape: Expected (C, H, W) of one input image in [0, 1].
        data_hash: Hash of the training data (lineage), "" if unknown.
        extra: Free-form lineage, str -> str/number/bool (attack, seed, epochs...).
        arch_kwargs: Architecture options given to ``build_model``, e.g. ``{"width": 2}``.
        format_version: Manifest format version, currently 1.
    """

    architecture: str
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape: tuple[int, int, int] = (3, 32, 32)
    data_hash: str = ""
    extra: dict[str, Scalar] = field(default_factory=dict)
    arch_kwargs: dict[str, Scalar] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Serialise to a JSON object string (tuples become lists)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_scalar_map(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and (isinstance(x, str | bool) or _is_num(x)) for k, x in v.items()
    )


def _tuple_of(check: Callable[[object], bool], n: int | None) -> Callable[[object], bool]:
    def ok(v: object) -> bool:
        return isinstance(v, list | tuple) and (n is None or len(v) == n) and all(map(check, v))

    return ok


# Per manifest key: (validator, description for the error message).
_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "architecture": (lambda v: isinstance(v, str), "a string"),
    "num_classes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "classes": (_tuple_of(lambda v: isinstance(v, str), None), "a list of strings"),
    "mean": (_tuple_of(_is_num, 3), "a list of 3 numbers"),
    "std": (_tuple_of(lambda v: _is_num(v) and v > 0, 3), "a list of 3 positive numbers"),
    "input_shape": (_tuple_of(lambda v: _is_int(v) and v >= 1, 3), "3 positive integers"),
    "data_hash": (lambda v: isinstance(v, str), "a string"),
    "extra": (_is_scalar_map, "an object of str -> str/number/bool"),
    "arch_kwargs": (_is_scalar_map, "an object of str -> str/number/bool"),
    "format_version": (lambda v: _is_int(v) and v == FORMAT_VERSION, f"{FORMAT_VERSION}"),
}
_REQUIRED = ("architecture", "num_classes", "classes", "mean", "std")


def _fail(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{path}: {problem}")


def weights_path(path: Path) -> Path:
    """The ``.safetensors`` file of a model given with or without suffix."""
    return modelfiles.files(path)[0]


def manifest_path(path: Path) -> Path:
    """The ``.json`` manifest of a model given with or without suffix."""
    return modelfiles.files(path)[1]


def manifest_from_dict(raw: Mapping[str, Any], path: Path) -> Manifest:
    """Validate a decoded manifest strictly (no unknown or missing keys, exact types).

    Raises:
        ModelFileError: Naming ``path`` and the first offending key.
    """
    unknown = sorted(set(raw) - set(_CHECKS))
    missing = [k for k in _REQUIRED if k not in raw]
    if unknown or missing:
        raise _fail(path, f"manifest has unknown keys {unknown} / missing keys {missing}")
    for key, value in raw.items():
        check, want = _CHECKS[key]
        if not check(value):
            raise _fail(path, f"manifest key {key!r} must be {want}, got {value!r}")
    values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in raw.items()}
    for key in ("mean", "std"):
        values[key] = tuple(float(x) for x in values[key])
    return _check_manifest(Manifest(**values), path)


def _check_manifest(manifest: Manifest, path: Path) -> Manifest:
    if manifest.architecture not in MODELS and not is_foreign(manifest.architecture):
        known = ", ".join(sorted(MODELS))
        raise _fail(path, f"unknown architecture {manifest.architecture!r}; known: {known}, "
                          f"or <registry>:<name> of {FOREIGN_REGISTRIES}")
    if manifest.num_classes != len(manifest.classes):
        n, c = manifest.num_classes, len(manifest.classes)
        raise _fail(path, f"num_classes is {n} but {c} class names are given")
    return manifest


def load_manifest(path: Path) -> Manifest:
    """Read and validate the ``.json`` manifest of a model (path with or without suffix).

    Raises:
        ModelFileError: Missing file, larger than 1 MiB, invalid JSON, unknown/missing keys, wrong
            types, unknown architecture or ``num_classes != len(classes)``.
    """
    mpath = manifest_path(path)
    try:
        if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
            raise _fail(mpath, f"manifest is larger than {_MAX_MANIFEST_BYTES} bytes; refused")
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(mpath, "manifest file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(mpath, f"manifest is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise _fail(mpath, "manifest must be a JSON object")
    return manifest_from_dict(raw, mpath)


def _build(manifest: Manifest) -> nn.Module:
    return build_model(
        manifest.architecture,
        manifest.num_classes,
        manifest.mean,
        manifest.std,
        **manifest.arch_kwargs,
    )


Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor
Specs = Mapping[str, Spec]


def _describe(manifest: Manifest) -> str:
    """The manifest keys that decide the tensors' sizes, for error messages."""
    return (
        f"architecture {manifest.architecture!r}, num_classes {manifest.num_classes}, "
        f"arch_kwargs {manifest.arch_kwargs}"
    )


def _reference_specs(manifest: Manifest, mpath: Path) -> dict[str, Spec]:
    """Name -> (shape, dtype) of every tensor the manifest's architecture expects.

    The model is built on the meta device: shapes only, no memory, whatever the manifest claims.
    """
    try:
        with torch.device("meta"):
            model = _build(manifest)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise _fail(mpath, f"cannot build the manifest's {_describe(manifest)} ({err})") from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_parameters(mpath: Path, manifest: Manifest, expected: Specs, limit: int) -> None:
    """Refuse a manifest whose architecture has more than ``limit`` tensor elements."""
    counts = {k: math.prod(shape) for k, (shape, _) in expected.items()}
    if sum(counts.values()) > limit:
        big = max(counts, key=counts.__getitem__)
        raise _fail(
            mpath,
            f"manifest's {_describe(manifest)} implies {sum(counts.values())} parameters, more "
            f"than max_parameters={limit} (largest: {big} {list(expected[big][0])})",
        )


def _mismatches(found: Specs, expected: Specs) -> list[str]:
    """Human-readable differences between two name -> (shape, dtype) maps, sorted by name."""
    problems = [f"missing {k}" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k}" for k in sorted(set(found) - set(expected))]
    for key in sorted(set(found) & set(expected)):
        if found[key] != expected[key]:
            (fs, fd), (es, ed) = found[key], expected[key]
            problems.append(f"{key}: file {list(fs)} {fd}, expected {list(es)} {ed}")
    return problems


def _state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors needs contiguous, unshared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: Path, manifest: Manifest) -> Path:
    """Save ``model`` as ``<stem>.safetensors`` + ``<stem>.json``, each written atomically.

    Args:
        model: A module built by ``build_model(manifest.architecture, ...)``.
        path: Destination, with or without the ``.safetensors``/``.json`` suffix.
        manifest: Description of the model; validated before anything is written.

    Returns:
        The path of the ``.safetensors`` file.

    Raises:
        ModelFileError: If the manifest is invalid or does not describe ``model``'s tensors.
    """
    wpath, mpath = weights_path(path), manifest_path(path)
    manifest = manifest_from_dict(json.loads(manifest.to_json()), mpath)
    tensors = _state_dict_of(model)
    found = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    problems = _mismatches(found, _reference_specs(manifest, mpath))
    if problems:
        raise _fail(wpath, f"model does not match manifest architecture: {problems[:_MAX_LISTED]}")
    wpath.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes its metadata from a Rust HashMap, whose order
    # (and so the file's bytes) varies from process to process once there are two keys.
    meta = {"format": "pt"}
    atomic_write(wpath, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write(mpath, lambda tmp: tmp.write_text(manifest.to_json() + "\n", encoding="utf-8"))
    return wpath


def _sniff(wpath: Path, size: int) -> None:
    """Refuse pickles, zip archives and anything without a plausible safetensors header."""
    with wpath.open("rb") as fh:
        head = fh.read(9)
    # A safetensors file starts with its header's length (8 bytes, little-endian), then "{".
    # Read that first: a length whose low byte is 0x80 (ResNet-18's, for one) also begins with
    # the pickle protocol marker. Neither reading unpickles anything; the order only names it.
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else None
    plausible = header_len is not None and header_len <= _MAX_HEADER_BYTES and head[8:9] == b"{"
    for magic, what in _PICKLE_MAGIC.items():
        if head.startswith(magic) and not plausible:
            raise _fail(wpath, f"refusing to load a pickle ({what}); only safetensors accepted")
    if header_len is None:
        raise _fail(wpath, f"truncated: {size} bytes is shorter than a safetensors header")
    if not plausible:
        raise _fail(
            wpath,
            "refusing to load a pickle or unknown format (implausible safetensors header); "
            "only safetensors accepted",
        )
    if header_len > size - 8:
        raise _fail(wpath, f"truncated: header needs {header_len} bytes, file has {size - 8}")


def _check_size(wpath: Path, size: int, expected: Specs, slack: float) -> None:
    """Refuse a file far larger than the architecture's tensors imply (before reading it)."""
    data = sum(math.prod(s) * d.itemsize for s, d in expected.values())
    limit = slack * (8 + data + _HEADER_BYTES_PER_TENSOR * (len(expected) + 4))
    if size > limit:
        raise _fail(wpath, f"file has {size} bytes, more than {slack} x the {data} expected")


def _read_tensors(wpath: Path, expected: Specs) -> dict[str, torch.Tensor]:
    """Check the header against ``expected``, then load every tensor (CPU) and check finiteness."""
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as fh:
            found = {k: _header_spec(fh, k) for k in fh.keys()}
            problems = _mismatches(found, expected)
            if problems:
                raise _fail(wpath, f"weights do not match architecture: {problems[:_MAX_LISTED]}")
            tensors = {k: fh.get_tensor(k) for k in found}
    except ModelFileError:
        raise
    except Exception as err:  # safetensors raises SafetensorError and others on corruption
        raise _fail(wpath, f"corrupt or truncated safetensors file ({err})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise _fail(wpath, f"non-finite (NaN/Inf) values in {bad[:_MAX_LISTED]}")
    return tensors


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header_spec(fh: Any, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
    """(shape, dtype) of one tensor from the header only, without reading its data."""
    sl = fh.get_slice(key)
    dtype = sl.get_dtype()
    return tuple(sl.get_shape()), _DTYPES.get(dtype, dtype)


def load_model(
    path: Path,
    map_location: str | torch.device = "cpu",
    max_bytes_slack: float = 1.5,
    max_parameters: int = MAX_PARAMETERS,
) -> tuple[nn.Module, Manifest]:
    """Load a model saved by :func:`save_model`, refusing anything unsafe or inconsistent.

    Nothing is allocated for the model's tensors until the manifest's architecture, sized on the
    meta device, has passed ``max_parameters``, the file's size and the safetensors header.

    Args:
        path: Model path, with or without the ``.safetensors``/``.json`` suffix.
        map_location: Device the returned model is moved to.
        max_bytes_slack: Refuse weights files larger than this times the expected size.
        max_parameters: Refuse manifests implying more tensor elements (parameters and
            buffers) than this.

    Returns:
        The model in eval mode, mapping (N, *input_shape) in [0, 1] to (N, num_classes), and its
        manifest.

    Raises:
        ModelFileError: Pickle/zip content, missing/malformed/oversize manifest, an
            architecture that cannot be built or exceeds ``max_parameters``, empty, truncated or
            oversize file, tensor name/shape/dtype mismatch, NaN/Inf weights, or Normalize
            buffers disagreeing with the manifest's mean/std. Never unpickles.
    """
    wpath = weights_path(path)
    _check_file(wpath)
    manifest = load_manifest(wpath)
    return load_weights_checked(wpath, manifest, manifest_path(path), map_location,
                                max_bytes_slack, max_parameters), manifest


def _check_file(wpath: Path) -> None:
    """There, not empty, not a pickle (reads 9 bytes)."""
    if not wpath.is_file():
        raise _fail(wpath, "weights file is missing")
    size = os.path.getsize(wpath)
    if size == 0:
        raise _fail(wpath, "file is empty (0 bytes)")
    _sniff(wpath, size)


def load_weights_checked(wpath: Path, manifest: Manifest, mpath: Path,
                         map_location: str | torch.device = "cpu", max_bytes_slack: float = 1.5,
                         max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """The model `manifest` describes, with the weights of the safetensors file `wpath`, through
    every check of `load_model` (`mpath`: the file named when the architecture is refused).
    """
    _check_file(wpath)
    size = os.path.getsize(wpath)
    expected = _reference_specs(manifest, mpath)  # meta device: no memory yet
    _check_parameters(mpath, manifest, expected, max_parameters)
    _check_size(wpath, size, expected, max_bytes_slack)
    # Header vs plan before any data is read; safetensors checks the data fills the file exactly.
    tensors = _read_tensors(wpath, expected)
    model = _build(manifest)
    model.load_state_dict(tensors, strict=True)
    _check_normalize(wpath, model, manifest)
    return model.to(map_location).eval()


def _check_normalize(wpath: Path, model: nn.Module, manifest: Manifest) -> None:
    """The stored Normalize buffers must equal the manifest's mean/std."""
    state = model.state_dict()
    for name in ("mean", "std"):
        stored = state.get(f"normalize.{name}")
        wanted = torch.tensor(getattr(manifest, name))
        if stored is not None and not torch.allclose(stored.flatten(), wanted, atol=1e-6):
            raise _fail(wpath, f"stored normalize.{name} {stored.flatten().tolist()} != manifest")


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(path: Path) -> str:
    """SHA-256 hex digest of the model's ``.safetensors`` file (path with or without suffix)."""
    return sha256_file(weights_path(path))


modelfiles.register_reader(modelfiles.SAFETENSORS, load_model)

__all__ = [
    "sha256_file",
    "FORMAT_VERSION",
    "MAX_PARAMETERS",
    "Manifest",
    "ModelFileError",
    "load_manifest",
    "load_model",
    "manifest_from_dict",
    "manifest_path",
    "model_fingerprint",
    "save_model",
    "weights_path",
]
