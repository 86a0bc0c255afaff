"""The canonical CIFAR archives: md5 check, restricted unpickling, and torchvision's download.

Reads ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (Krizhevsky, "Learning Multiple
Layers of Features from Tiny Images", 2009), whose members are Python pickles; they are unpickled
only after the archive's md5 matched the published digest, and then only into numpy arrays and
builtin containers. Every bad input raises :class:`~mesa_lib.imageset.DataError`, whose message
names the offending file.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torchvision

from mesa_lib.archive_io import ARCHIVE_ERRORS, file_digest, iter_archive, require_file
from mesa_lib.imageset import IMAGE_SHAPE, CifarData, DataError, ImageSet, checked_set

# Published digests of the canonical archives; looked up at call time so tests can patch them.
CANONICAL_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7a017df2e1c6c9d02",
}
# Default of ``expected_md5``: "use CANONICAL_MD5[name]".
USE_CANONICAL_MD5 = "canonical"


@dataclass(frozen=True)
class CanonicalSpec:
    """Layout of one canonical archive: file name, member names and pickle keys."""

    filename: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: str
    classes_key: str
    torchvision_class: str


_CANONICAL = {
    "cifar10": CanonicalSpec(
        filename="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_key="labels",
        classes_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": CanonicalSpec(
        filename="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        meta_member="meta",
        label_key="fine_labels",
        classes_key="fine_label_names",
        torchvision_class="CIFAR100",
    ),
}


def canonical_spec(name: str) -> CanonicalSpec:
    """The layout of data set ``name``; ``DataError`` for an unknown name."""
    if name not in _CANONICAL:
        raise DataError(f"unknown data set name {name!r}; expected one of {sorted(_CANONICAL)}")
    return _CANONICAL[name]


def canonical_name_of(filename: str) -> str | None:
    """The data set name whose canonical archive is called ``filename``, else ``None``."""
    return next((n for n, s in _CANONICAL.items() if s.filename == filename), None)


def _check_md5(path: Path, expected: str) -> None:
    actual = file_digest(path, "md5")
    if actual != expected.lower():
        raise DataError(f"md5 of {path} is {actual}, expected {expected}")


# --------------------------------------------------------------------------- restricted unpickling


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and builtin containers.

    The canonical batches hold dicts of lists, strings and one ``ndarray``; refusing every other
    global makes a caller's own (unverified) file unable to run code while it is read.
    """

    # numpy pickles name its private rebuild functions under numpy.core (numpy 1) or
    # numpy._core (numpy 2); take the functions from numpy itself rather than import by name.
    _RECONSTRUCT = np.zeros(0).__reduce__()[0]
    _FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("_codecs", "encode"): codecs.encode,  # protocol 2 bytes written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return self._ALLOWED[(module, name)]


def _unpickle(blob: bytes, path: Path, member: str) -> dict[str, object]:
    try:
        record = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: member {member} is not a readable pickle ({err})") from err
    if not isinstance(record, dict):
        raise DataError(f"{path}: member {member} holds {type(record).__name__}, not a dict")
    return record


# --------------------------------------------------------------------------- canonical format


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the named members of a tar archive in one sequential pass (no extraction)."""
    found: dict[str, bytes] = {}
    try:
        for name, blob in iter_archive(path):
            if name in wanted:
                found[name] = blob
    except ARCHIVE_ERRORS as err:
        raise DataError(f"archive {path} is truncated or corrupt ({err})") from err
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"archive {path} lacks member(s) {missing}")
    return found


def _batch_arrays(
    record: dict[str, object], key: str, path: Path, member: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (n, 3, 32, 32), labels int64 (n,))`` of one canonical batch."""
    try:
        data, labels = record["data"], record[key]
    except KeyError as err:
        raise DataError(f"{path}: member {member} has no key {err}") from err
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: member {member} data is {data.dtype} {data.shape}, expected uint8 (n, 3072)"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: member {member} has {labels.shape} labels for {len(data)} images")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _canonical_set(
    blobs: dict[str, bytes],
    members: tuple[str, ...],
    key: str,
    classes: tuple[str, ...],
    path: Path,
) -> ImageSet:
    parts = [_batch_arrays(_unpickle(blobs[m], path, m), key, path, m) for m in members]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return checked_set(images, labels, classes, path)


def load_canonical_archive(
    path: Path, name: str = "cifar10", expected_md5: str | None = USE_CANONICAL_MD5
) -> CifarData:
    """Load a canonical ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz``.

    Members are read straight from the tarfile and unpickled (``encoding="latin1"``, numpy
    arrays only). CIFAR-100 uses the fine labels and ``meta``'s ``fine_label_names``.

    Args:
        path: the ``.tar.gz`` archive.
        name: ``"cifar10"`` or ``"cifar100"``.
        expected_md5: hex md5 the archive must have; the default uses the published digest
            ``CANONICAL_MD5[name]``, which is what makes the pickles trusted. ``None`` skips the
            check: the archive is then the caller's own file and is trusted as such.

    Returns:
        ``CifarData`` with uint8 images ``(50000|N, 3, 32, 32)`` and int64 labels.

    Raises:
        DataError: missing file, md5 mismatch, truncated archive, missing member or bad content.
    """
    spec = canonical_spec(name)
    path = Path(path)
    require_file(path)
    if expected_md5 == USE_CANONICAL_MD5:
        expected_md5 = CANONICAL_MD5[name]
    if expected_md5 is not None:
        _check_md5(path, expected_md5)
    members = (*spec.train_members, spec.test_member, spec.meta_member)
    blobs = _read_members(path, {f"{spec.folder}/{m}" for m in members})
    blobs = {m: blobs[f"{spec.folder}/{m}"] for m in members}
    meta = _unpickle(blobs[spec.meta_member], path, spec.meta_member)
    if spec.classes_key not in meta:
        raise DataError(f"{path}: member {spec.meta_member} has no key {spec.classes_key!r}")
    classes = tuple(str(c) for c in meta[spec.classes_key])  # type: ignore[attr-defined]
    train = _canonical_set(blobs, spec.train_members, spec.label_key, classes, path)
    test = _canonical_set(blobs, (spec.test_member,), spec.label_key, classes, path)
    return CifarData(train=train, test=test)


# --------------------------------------------------------------------------- download


def download_cifar(root: Path, name: str = "cifar10") -> Path:
    """Download the canonical archive into ``root`` with torchvision and return its path.

    Raises:
        DataError: the download failed (e.g. no network); the message suggests a local archive.
    """
    spec = canonical_spec(name)
    root = Path(root)
    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        dataset_class(root=str(root), train=True, download=True)
    except (URLError, OSError, RuntimeError) as err:
        raise DataError(
            f"download of {spec.filename} into {root} failed ({err}); pass a local archive "
            "instead (the canonical file, or an image-folder archive of CIFAR)"
        ) from err
    archive = root / spec.filename
    require_file(archive)
    return archive
