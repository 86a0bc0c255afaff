"""Reading data files: existence checks, digests, and the members of tar or zip archives.

Shared by the canonical-archive loader (:mod:`mesa_lib.cifar_archive`) and the image-folder
loader (:mod:`mesa_lib.imagefolder`). Members are read in memory; nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from mesa_lib.imageset import DataError

_CHUNK = 1 << 20
# What a truncated or corrupt archive raises while it is read.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def require_file(path: Path) -> None:
    """Raise ``DataError`` unless ``path`` is an existing regular file."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
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
