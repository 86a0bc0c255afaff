"""The labelled-image containers every CIFAR loader returns, and the error they raise.

The whole data set is held as one ``uint8`` tensor of shape ``(N, 3, 32, 32)`` plus an ``int64``
label vector, in the style of KellerJordan/cifar10-airbench: poisoning and splitting are tensor
indexing, not ``Dataset`` subclasses. This module has no I/O, so the loaders
(:mod:`mesa_lib.cifar_archive`, :mod:`mesa_lib.imagefolder`) and the front door
(:mod:`mesa_lib.data`) can all import it without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_SHAPE = (3, 32, 32)


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


def checked_set(
    images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], path: Path
) -> ImageSet:
    """An ``ImageSet`` whose labels are checked to lie in ``0..len(classes) - 1``.

    Raises:
        DataError: a label is out of range (the message names ``path``).
    """
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
    return ImageSet(images, labels, classes)
