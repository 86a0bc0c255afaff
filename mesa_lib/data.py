"""CIFAR-10 / CIFAR-100 as whole-data-set uint8 tensors: the front door.

The whole data set is held as one ``uint8`` tensor of shape ``(N, 3, 32, 32)`` plus an ``int64``
label vector (:class:`ImageSet`), in the style of KellerJordan/cifar10-airbench: poisoning and
splitting are tensor indexing, not ``Dataset`` subclasses.

Two on-disk formats are read, each by its own module:

* the canonical ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` archives (Krizhevsky,
  "Learning Multiple Layers of Features from Tiny Images", 2009), whose members are Python
  pickles; they are unpickled only after the archive's md5 matched the published digest
  (:mod:`mesa_lib.cifar_archive`, which also downloads them with torchvision);
* an image-folder archive or directory ``{train,test}/<class>/*.{jpg,jpeg,png}`` such as the
  JPEG export of CIFAR-10; decoding is batched through
  ``torchvision.io`` and cached once as an uncompressed ``.npz`` keyed by the archive's sha256
  (:mod:`mesa_lib.imagefolder`).

:func:`load_cifar` picks the loader from the source's name. Every bad input raises
:class:`DataError`, whose message names the offending file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mesa_lib.archive_io import require_file
from mesa_lib.cifar_archive import (
    CANONICAL_MD5,
    canonical_name_of,
    canonical_spec,
    download_cifar,
    load_canonical_archive,
)
from mesa_lib.imagefolder import load_image_folder_archive
from mesa_lib.imageset import CifarData, DataError, ImageSet
from mesa_lib.seed import derive_seed

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_N_CLASSES = {"cifar10": 10, "cifar100": 100}


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
    canonical_spec(name)
    canonical = canonical_name_of(source.name)
    if canonical is not None and not source.is_dir():
        if canonical != name:
            raise DataError(f"{source} is the {canonical} archive but name is {name!r}")
        if not source.exists():
            source = download_cifar(source.parent, name)
        return load_canonical_archive(source, name, expected_md5=CANONICAL_MD5[name])
    if source.is_dir() or source.name.lower().endswith(ARCHIVE_SUFFIXES):
        return load_image_folder_archive(source, cache_dir, expected_classes=_N_CLASSES[name])
    require_file(source)
    raise DataError(f"{source} is neither a directory nor an archive {ARCHIVE_SUFFIXES}")


def _cut(n: int, first: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random cut of 0..n-1 into `first` and the rest, each sorted ascending."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:first].sort().values, order[first:].sort().values


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
    defender, held_out = _cut(len(test), n_defender, generator_seed)
    return test.subset(defender), test.subset(held_out)


@dataclass(frozen=True)
class ProtocolSplit:
    """The reproduction's three disjoint parts of a test set, as sorted int64 indices.

    Attributes:
        fit: the defender's images for fitting trigger models and repairing.
        validation: the defender's images for every choice (rates, epochs, thresholds).
        evaluation: read only to write the final table.
    """

    fit: torch.Tensor
    validation: torch.Tensor
    evaluation: torch.Tensor


def split_protocol(n_test: int, n_defender: int, n_validation: int, seed: int) -> ProtocolSplit:
    """Cut 0..n_test-1 into fit / validation (the defender's n_defender) and evaluation.

    The defender / evaluation cut is `split_defender`'s (seed `derive_seed(seed,
    "defender_split")`), the fit / validation cut a second seeded draw inside the defender's part.
    """
    if not 0 < n_validation < n_defender < n_test:
        raise DataError(f"need 0 < n_validation ({n_validation}) < n_defender ({n_defender}) "
                        f"< n_test ({n_test})")
    defender, evaluation = _cut(n_test, n_defender, derive_seed(seed, "defender_split"))
    fit, validation = _cut(n_defender, n_defender - n_validation,
                           derive_seed(seed, "validation_split"))
    return ProtocolSplit(defender[fit], defender[validation], evaluation)


def seeded_subset(n: int, total: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random n-of-total subset (all if n is 0 or >= total).

    A random draw, not a prefix: splits keep the raw order, which is grouped by class in
    image-folder archives, so a prefix would be a biased sample.

    Returns:
        int64 (min(n, total),) or (total,), ascending.
    """
    if n <= 0 or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def data_fingerprint(data: CifarData) -> str:
    """Sha256 hex digest over classes, shapes and the image and label bytes of both splits."""
    digest = hashlib.sha256()
    for part in (data.train, data.test):
        header = f"{tuple(part.images.shape)}|{'|'.join(part.classes)}\n"
        digest.update(header.encode())
        digest.update(part.images.contiguous().numpy())  # buffer protocol: no 150 MB copy
        digest.update(part.labels.contiguous().numpy())
    return digest.hexdigest()
