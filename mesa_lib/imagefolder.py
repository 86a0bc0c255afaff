"""Image-folder archives ``{train,test}/<class>/*.{jpg,jpeg,png}`` decoded to uint8 tensors.

Reads an archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.zip``) or a directory laid out as
``{train,test}/<class>/<image>``, such as a JPEG export of CIFAR-10; decoding is batched
through ``torchvision.io`` and cached once as an uncompressed ``.npz`` keyed by the archive's
sha256. Every bad input raises :class:`~mesa_lib.imageset.DataError`, whose message names the
offending file.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision
from torchvision.io import ImageReadMode

from mesa_lib.archive_io import ARCHIVE_ERRORS, file_digest, iter_archive, require_file
from mesa_lib.fileio import atomic_write
from mesa_lib.imageset import IMAGE_SHAPE, CifarData, DataError, ImageSet, checked_set

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
_CACHE_VERSION = 1


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
    reader = _iter_directory(source) if source.is_dir() else iter_archive(source)
    try:
        entries = [e for name, blob in reader if (e := _entry(name, blob)) is not None]
    except ARCHIVE_ERRORS as err:
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
    return cache_dir / f"imagefolder-{file_digest(archive, 'sha256')}.npz"


def _save_cache(path: Path, data: CifarData) -> None:
    """Write the cache atomically as an uncompressed, pickle-free npz."""
    arrays = {
        "version": np.array(_CACHE_VERSION),
        "classes": np.array(data.train.classes, dtype=np.str_),
        "train_images": data.train.images.numpy(),
        "train_labels": data.train.labels.numpy(),
        "test_images": data.test.images.numpy(),
        "test_labels": data.test.labels.numpy(),
    }

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)  # 0644: the cache is shared like any data file


def _load_cache(path: Path) -> CifarData:
    """Read a cache file; any damage raises ``DataError``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["version"]) != _CACHE_VERSION:
                raise DataError(f"cache {path} has version {int(npz['version'])}")
            classes = tuple(str(c) for c in npz["classes"])
            sets = [
                checked_set(
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
        require_file(path)
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
