"""The scan's reference data and its cutting of a model's classes into chunks.

The defender's reference data: the pipeline's defender split, a CIFAR archive, or an `.npz`
given with the model. `chunks` cuts a model's classes so that Prefect task runners (threads,
Dask) fit them in parallel; each chunk is measured by the detectors (`mesa_lib.detectors`)
and the verdict over all classes comes from `mesa_lib.calibration.decide` (tasks.scan.core).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from mesa_lib.data import DataError, load_cifar, seeded_subset, split_defender
from mesa_lib.seed import derive_seed
from tasks.common import catalog
from tasks.common.env import CACHE_DIR, default_data_source
from tasks.common.io import load_npz
from tasks.common.params import Params
from tasks.common.rawdata import resolve_archive


@dataclass(frozen=True)
class Reference:
    """The defender's clean images: uint8 (N, C, H, W), int64 labels (N,) or None, class names."""

    images: Tensor
    labels: Tensor | None
    classes: tuple[str, ...]
    source: str


def _npz_reference(path: Path) -> Reference:
    """`images`/`labels`/`classes` arrays, or the pipeline's `defender_*` split (no pickles)."""
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as err:
        raise DataError(f"reference data {path}: not a readable npz without pickles ({err})"
                        ) from None
    prefix = "defender_" if "defender_images" in arrays else ""
    images, labels = arrays.get(f"{prefix}images"), arrays.get(f"{prefix}labels")
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"reference data {path}: `{prefix}images` must be uint8 (N, C, H, W)")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]
                               or labels.is_floating_point()):
        raise DataError(f"reference data {path}: `{prefix}labels` must be integers (N,)")
    labels = None if labels is None else labels.long()
    names = arrays.get("classes")
    if names is not None:
        classes = tuple(str(c) for c in names.tolist())
    elif labels is not None:
        classes = tuple(str(k) for k in range(int(labels.max()) + 1))
    else:
        raise DataError(f"reference data {path}: needs `classes` or `labels`")
    return Reference(images, labels, classes, str(path))


def _auto_reference(params: Params) -> Reference:
    """The pipeline's defender split if built, else the same split decoded from the archive."""
    if catalog.path("dataset").is_file():
        return _npz_reference(catalog.path("dataset"))

    try:
        source = resolve_archive(catalog.DATA_DIR, params.data.archive, params.data.name)
    except DataError:
        source = default_data_source()
    return _archive_reference(source, params)


def _archive_reference(source: Path, params: Params) -> Reference:
    """The defender split of a CIFAR archive's test set, cut as the data stage cuts it."""
    data = load_cifar(source, params.data.name, CACHE_DIR)
    seed = derive_seed(params.base.seed, "defender_split")
    defender, _ = split_defender(data.test, params.data.n_defender, seed)
    return Reference(defender.images, defender.labels, defender.classes, str(source))


@lru_cache(maxsize=4)
def _cached(spec: str, stamp: int, params: Params) -> Reference:
    return _auto_reference(params) if spec == "auto" else _npz_reference(Path(spec))


def load_reference(params: Params, override: Path | None = None) -> Reference:
    """The model's own `.data.npz` if given, else `scan.reference` (cached per process)."""
    spec = str(override) if override else params.scan.reference
    if spec != "auto" and not spec.endswith(".npz"):  # a CIFAR archive or folder
        return _archive_reference(Path(spec), params)
    target = catalog.path("dataset") if spec == "auto" else Path(spec)
    stamp = target.stat().st_mtime_ns if target.is_file() else 0
    return _cached(spec, stamp, params)


def scan_indices(ref: Reference, n_images: int, seed: int) -> Tensor:
    """int64 indices of the seeded random subset of n_images (all if 0) a scan measures."""
    return seeded_subset(n_images, len(ref.images), derive_seed(seed, "scan_subset"))


def reference_batch(ref: Reference, n_images: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """A seeded random subset of n_images (all if 0), in the reference's order (labels alike)."""
    order = scan_indices(ref, n_images, seed)
    return ref.images[order], None if ref.labels is None else ref.labels[order]


def chunks(n_classes: int, parts: int) -> list[tuple[int, ...]]:
    """Classes 0..n-1 cut into `parts` contiguous, nearly equal chunks (no empty one)."""
    parts = max(1, min(parts, n_classes))
    bounds = [round(i * n_classes / parts) for i in range(parts + 1)]
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
