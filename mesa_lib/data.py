"""CIFAR-10 / CIFAR-100 as whole-data-set uint8 tensors.

The whole data set is held as one ``uint8`` tensor of shape ``(N, 3, 32, 32)`` plus an ``int64``
label vector, in the style of KellerJordan/cifar10-airbench: poisoning and splitting are tensor
indexing, not ``Dataset`` subclasses.

Two on-disk formats are read:

* the canonical ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` archives (Krizhevsky,
  "Learning Multiple Layers of Features from Tiny Images", 2009), whose members are Python
  pickles; they are unpickled only after the archive's md5 matched the published digest;
* an image-folder archive or directory ``{train,test}/<class>/*.{jpg,jpeg,png}`` such as the
  offline copy ``../shared/datasets/cifar10-jpeg.tar.gz``; decoding is batched through
  ``torchvision.io`` and cached once as an uncompressed ``.npz`` keyed by the archive's sha256.

Every bad input raises :class:`DataError`, whose message names the offending file.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import URLError

import numpy as np
import torch
import torchvision
from torchvision.io import ImageReadMode

IMAGE_SHAPE = (3, 32, 32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SPLITS = ("train", "test")
# Published digests of the canonical archives; looked up at call time so tests can patch them.
CANONICAL_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7a017df2e1c6c9d02",
}
# Default of ``expected_md5``: "use CANONICAL_MD5[name]".
USE_CANONICAL_MD5 = "canonical"
OFFLINE_HINT = "../shared/datasets/cifar10-jpeg.tar.gz"
_CACHE_VERSION = 1
_CHUNK = 1 << 20


class DataError(ValueError):
    """A data file is missing, corrupt, of the wrong format, or fails a check."""


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set held as whole tensors.

    Attributes:
        images: ``uint8`` tensor ``(N, 3, 32, 32)``, pixel values 0..255, RGB, CHW.
        labels: ``int64`` tensor ``(N,)`` with values in ``0..len(classes) - 1``.
        classes: class names; ``classes[k]`` is the name of label ``k``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(
                f"images must be uint8 (N, 3, 32, 32), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> ImageSet:
        """Select images by an ``int64`` index ``(M,)`` or a ``bool`` mask ``(N,)``."""
        return ImageSet(self.images[index], self.labels[index], self.classes)


@dataclass(frozen=True)
class CifarData:
    """The train and test sets of one CIFAR variant (same ``classes``)."""

    train: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class _CanonicalSpec:
    filename: str
    folder: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: str
    classes_key: str
    torchvision_class: str


_CANONICAL = {
    "cifar10": _CanonicalSpec(
        filename="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_key="labels",
        classes_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CanonicalSpec(
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
_N_CLASSES = {"cifar10": 10, "cifar100": 100}


# --------------------------------------------------------------------------- shared helpers


def _spec(name: str) -> _CanonicalSpec:
    if name not in _CANONICAL:
        raise DataError(f"unknown data set name {name!r}; expected one of {sorted(_CANONICAL)}")
    return _CANONICAL[name]


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")


def _file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    actual = _file_digest(path, "md5")
    if actual != expected.lower():
        raise DataError(f"md5 of {path} is {actual}, expected {expected}")


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` for every regular file of a tar (any compression) or zip."""
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, archive.read(info)
        return
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            handle = archive.extractfile(member) if member.isfile() else None
            if handle is not None:
                yield member.name, handle.read()


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


# --------------------------------------------------------------------------- canonical format


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


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the named members of a tar archive in one sequential pass (no extraction)."""
    found: dict[str, bytes] = {}
    try:
        for name, blob in _iter_archive(path):
            if name in wanted:
                found[name] = blob
    except _ARCHIVE_ERRORS as err:
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
    return _checked_set(images, labels, classes, path)


def _checked_set(
    images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], path: Path
) -> ImageSet:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
    return ImageSet(images, labels, classes)


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
    spec = _spec(name)
    path = Path(path)
    _require_file(path)
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


# --------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class _Entry:
    split: str
    label_name: str
    member: str
    blob: bytes


def _entry(member: str, blob: bytes) -> _Entry | None:
    """Classify a member as ``.../{train,test}/<class>/<image>``; ``None`` for anything else."""
    parts = PurePosixPath(member).parts
    if len(parts) < 3 or parts[-3] not in SPLITS or parts[-1].startswith("."):
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    return _Entry(parts[-3], parts[-2], member, blob)


def _iter_directory(root: Path) -> Iterator[tuple[str, bytes]]:
    for file in sorted(root.rglob("*")):
        if file.is_file():
            yield file.relative_to(root).as_posix(), file.read_bytes()


def _collect(source: Path) -> list[_Entry]:
    """Read every image member of an image-folder archive or directory, sorted by member name."""
    reader = _iter_directory(source) if source.is_dir() else _iter_archive(source)
    try:
        entries = [e for name, blob in reader if (e := _entry(name, blob)) is not None]
    except _ARCHIVE_ERRORS as err:
        raise DataError(f"archive {source} is truncated or corrupt ({err})") from err
    return sorted(entries, key=lambda e: e.member)


def _class_names(entries: list[_Entry], source: Path, expected: int | None) -> tuple[str, ...]:
    """Sorted class-folder names; train and test must hold the same set."""
    found = {split: {e.label_name for e in entries if e.split == split} for split in SPLITS}
    if not found["train"] or not found["test"]:
        raise DataError(f"{source}: no images under train/<class>/ and test/<class>/")
    if found["train"] != found["test"]:
        only_train = sorted(found["train"] - found["test"])
        only_test = sorted(found["test"] - found["train"])
        raise DataError(
            f"{source}: train and test class folders differ "
            f"(only in train: {only_train}, only in test: {only_test})"
        )
    classes = tuple(sorted(found["train"]))
    if expected is not None and len(classes) != expected:
        raise DataError(f"{source}: {len(classes)} class folders, expected {expected}")
    return classes


def _decode_one(entry: _Entry) -> torch.Tensor:
    data = torch.frombuffer(bytearray(entry.blob), dtype=torch.uint8)
    try:
        return torchvision.io.decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataError(f"image {entry.member} cannot be decoded ({err})") from err


def _decode_all(entries: list[_Entry]) -> list[torch.Tensor]:
    """Decode images to RGB uint8 ``(3, H, W)``; JPEGs in one batched call, others one by one."""
    is_jpeg = [e.blob[:2] == b"\xff\xd8" for e in entries]
    jpegs = [e for e, j in zip(entries, is_jpeg, strict=True) if j]
    decoded: list[torch.Tensor] = []
    try:
        buffers = [torch.frombuffer(bytearray(e.blob), dtype=torch.uint8) for e in jpegs]
        decoded = torchvision.io.decode_jpeg(buffers, mode=ImageReadMode.RGB) if jpegs else []
    except RuntimeError:
        decoded = [_decode_one(e) for e in jpegs]  # finds and names the broken member
    batch = iter(decoded)
    return [next(batch) if j else _decode_one(e) for e, j in zip(entries, is_jpeg, strict=True)]


def _stack_split(
    entries: list[_Entry],
    images: list[torch.Tensor],
    split: str,
    classes: tuple[str, ...],
    source: Path,
) -> ImageSet:
    index = {name: k for k, name in enumerate(classes)}
    chosen = [(e, im) for e, im in zip(entries, images, strict=True) if e.split == split]
    for entry, image in chosen:
        if tuple(image.shape) != IMAGE_SHAPE:
            raise DataError(
                f"{source}: image {entry.member} is {tuple(image.shape)} (C, H, W), "
                f"expected {IMAGE_SHAPE}"
            )
    stacked = torch.stack([im for _, im in chosen])
    labels = torch.tensor([index[e.label_name] for e, _ in chosen], dtype=torch.int64)
    return ImageSet(stacked, labels, classes)


def _decode_folder(source: Path, expected_classes: int | None) -> CifarData:
    entries = _collect(source)
    classes = _class_names(entries, source, expected_classes)
    images = _decode_all(entries)
    train = _stack_split(entries, images, "train", classes, source)
    test = _stack_split(entries, images, "test", classes, source)
    return CifarData(train=train, test=test)


# --------------------------------------------------------------------------- npz cache


def _cache_path(cache_dir: Path, archive: Path) -> Path:
    return cache_dir / f"imagefolder-{_file_digest(archive, 'sha256')}.npz"


def _save_cache(path: Path, data: CifarData) -> None:
    """Write the cache atomically (temp file + rename) as an uncompressed, pickle-free npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "version": np.array(_CACHE_VERSION),
        "classes": np.array(data.train.classes, dtype=np.str_),
        "train_images": data.train.images.numpy(),
        "train_labels": data.train.labels.numpy(),
        "test_images": data.test.images.numpy(),
        "test_labels": data.test.labels.numpy(),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared like any data file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_cache(path: Path) -> CifarData:
    """Read a cache file; any damage raises ``DataError``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["version"]) != _CACHE_VERSION:
                raise DataError(f"cache {path} has version {int(npz['version'])}")
            classes = tuple(str(c) for c in npz["classes"])
            sets = [
                _checked_set(
                    torch.from_numpy(npz[f"{s}_images"]),
                    torch.from_numpy(npz[f"{s}_labels"]),
                    classes,
                    path,
                )
                for s in SPLITS
            ]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cache {path} is unreadable ({err})") from err
    return CifarData(train=sets[0], test=sets[1])


def load_image_folder_archive(
    path: Path, cache_dir: Path | None = None, expected_classes: int | None = None
) -> CifarData:
    """Load ``train/<class>/*`` and ``test/<class>/*`` images from an archive or a directory.

    Archives may be ``.tar.gz``, ``.tgz``, ``.tar`` or ``.zip``; members are read in memory.
    Class ``k`` is the ``k``-th class folder in sorted order; images are ordered by member name.
    Images are decoded to RGB and must be 32x32. With ``cache_dir``, a decoded archive is stored
    as ``cache_dir/imagefolder-<sha256 of the archive>.npz`` and later loads read that file; a
    damaged cache file is deleted and rebuilt. Directories are never cached.

    Args:
        path: archive file or extracted directory.
        cache_dir: folder for the decoded cache, or ``None`` for no cache.
        expected_classes: number of class folders required, or ``None`` for any.

    Returns:
        ``CifarData`` with uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    Raises:
        DataError: missing or corrupt archive, unequal train/test class folders, wrong class
            count, an undecodable image or one that is not 32x32.
    """
    path = Path(path)
    if not path.is_dir():
        _require_file(path)
    if cache_dir is None or path.is_dir():
        return _decode_folder(path, expected_classes)
    data = _cached_decode(path, Path(cache_dir), expected_classes)
    if expected_classes is not None and len(data.train.classes) != expected_classes:
        raise DataError(
            f"{path}: {len(data.train.classes)} class folders, expected {expected_classes}"
        )
    return data


def _cached_decode(path: Path, cache_dir: Path, expected_classes: int | None) -> CifarData:
    """Serve ``path`` from its sha256-keyed cache, or decode it and write the cache."""
    cache = _cache_path(cache_dir, path)
    if cache.exists():
        try:
            return _load_cache(cache)
        except DataError:
            cache.unlink(missing_ok=True)  # never trust a damaged cache; rebuild it below
    data = _decode_folder(path, expected_classes)
    _save_cache(cache, data)
    return data


# --------------------------------------------------------------------------- entry points


def download_cifar(root: Path, name: str = "cifar10") -> Path:
    """Download the canonical archive into ``root`` with torchvision and return its path.

    Raises:
        DataError: the download failed (e.g. no network); the message suggests a local archive.
    """
    spec = _spec(name)
    root = Path(root)
    dataset_class = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        root.mkdir(parents=True, exist_ok=True)
        dataset_class(root=str(root), train=True, download=True)
    except (URLError, OSError, RuntimeError) as err:
        raise DataError(
            f"download of {spec.filename} into {root} failed ({err}); pass a local archive "
            f"instead, e.g. {OFFLINE_HINT}"
        ) from err
    archive = root / spec.filename
    _require_file(archive)
    return archive


def _name_of_canonical(filename: str) -> str | None:
    return next((n for n, s in _CANONICAL.items() if s.filename == filename), None)


def load_cifar(source: Path, name: str = "cifar10", cache_dir: Path | None = None) -> CifarData:
    """Load CIFAR from whatever ``source`` is.

    * a directory, or a ``.tar.gz``/``.tgz``/``.tar``/``.zip`` not named like a canonical archive:
      image folders (:func:`load_image_folder_archive`, 10 or 100 classes required);
    * ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``: the canonical loader, md5
      checked against ``CANONICAL_MD5``; if absent it is first downloaded into its parent.

    Args:
        source: path of an archive or directory.
        name: ``"cifar10"`` or ``"cifar100"``.
        cache_dir: cache folder for decoded image-folder archives.

    Raises:
        DataError: see the loaders; also a source that is missing, of unknown kind, or a
            canonical file name that contradicts ``name``.
    """
    source = Path(source)
    _spec(name)
    canonical = _name_of_canonical(source.name)
    if canonical is not None and not source.is_dir():
        if canonical != name:
            raise DataError(f"{source} is the {canonical} archive but name is {name!r}")
        if not source.exists():
            source = download_cifar(source.parent, name)
        return load_canonical_archive(source, name, expected_md5=CANONICAL_MD5[name])
    if source.is_dir() or source.name.lower().endswith(ARCHIVE_SUFFIXES):
        return load_image_folder_archive(source, cache_dir, expected_classes=_N_CLASSES[name])
    _require_file(source)
    raise DataError(f"{source} is neither a directory nor an archive {ARCHIVE_SUFFIXES}")


def split_defender(
    test: ImageSet, n_defender: int, generator_seed: int
) -> tuple[ImageSet, ImageSet]:
    """Split a test set at random into the defender's clean set and the held-out rest.

    Args:
        test: the set to split, ``N`` images.
        n_defender: size of the first part, ``0 <= n_defender <= N`` (e.g. 8000 of 10000).
        generator_seed: seed of the ``torch.Generator`` drawing the permutation.

    Returns:
        ``(defender, held_out)`` of sizes ``n_defender`` and ``N - n_defender``; disjoint, each
        in the original order; the same seed gives the same split.
    """
    if not 0 <= n_defender <= len(test):
        raise DataError(f"n_defender={n_defender} outside 0..{len(test)}")
    generator = torch.Generator().manual_seed(generator_seed)
    order = torch.randperm(len(test), generator=generator)
    defender, held_out = order[:n_defender].sort().values, order[n_defender:].sort().values
    return test.subset(defender), test.subset(held_out)


def data_fingerprint(data: CifarData) -> str:
    """Sha256 hex digest over classes, shapes and the image and label bytes of both splits."""
    digest = hashlib.sha256()
    for part in (data.train, data.test):
        header = f"{tuple(part.images.shape)}|{'|'.join(part.classes)}\n"
        digest.update(header.encode())
        digest.update(part.images.contiguous().numpy())  # buffer protocol: no 150 MB copy
        digest.update(part.labels.contiguous().numpy())
    return digest.hexdigest()


def default_source(project_root: Path) -> Path:
    """Where CIFAR-10 comes from when nobody says: $MESA_DATA_SOURCE, else the offline copy
    `<project_root>/../shared/datasets/cifar10-jpeg.tar.gz` if present, else the canonical
    archive `<project_root>/data/cifar-10-python.tar.gz` (downloaded by `load_cifar` if missing).
    """
    env = os.environ.get("MESA_DATA_SOURCE")
    if env:
        return Path(env)
    offline = Path(project_root).resolve().parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
    return offline if offline.exists() else Path(project_root) / "data" / "cifar-10-python.tar.gz"
