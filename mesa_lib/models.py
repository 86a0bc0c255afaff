"""CIFAR classifiers that take pixel-space images and normalise inside the model.

Every model maps float images in [0, 1], shape (N, 3, H, W), to logits (N, num_classes). The
first module is a :class:`Normalize` holding mean/std as buffers, so triggers are stamped in pixel
space everywhere (poisoning, MESA trigger modelling, repair) and the normalisation travels with the
weights. Architectures:

- ``resnet18``: the CIFAR ResNet-18 used by the MESA authors (kuangliu/pytorch-cifar): 3x3 stem,
  no max-pool, BasicBlocks [2, 2, 2, 2] with widths 64/128/256/512 (He et al., CVPR 2016).
- ``preact_resnet18``: BackdoorBench's pre-activation ResNet-18 (He et al., ECCV 2016); like
  BackdoorBench it has no BatchNorm/ReLU after the last block.
- ``resnet20``: He et al.'s CIFAR ResNet-20 (3 blocks per stage, widths 16/32/64), with 1x1
  projection shortcuts (option B) so it shares the BasicBlock.
- ``resnet8``: a small fast CPU model, one BasicBlock per stage, widths 16/32/64 x ``width``.

Beside these, ``torchvision:<name>`` and ``timm:<name>``: a network of a pinned library's own
registry, built by that library (mesa_lib.foreign; no user code runs), with the same
[0, 1]-pixels-in convention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

Stats = Sequence[float]


class Normalize(nn.Module):
    """Per-channel standardisation ``(x - mean) / std`` with mean/std stored as buffers.

    Args:
        mean: Per-channel mean, length C.
        std: Per-channel standard deviation, length C, all > 0.
    """

    def __init__(self, mean: Stats, std: Stats) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must match, std > 0")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise images (N, C, H, W) in [0, 1] -> (N, C, H, W), roughly zero mean."""
        return (x - self.mean) / self.std


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """1x1 conv shortcut where the block changes shape, else None (identity)."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, plus shortcut, then ReLU.

    Maps (N, in_ch, H, W) -> (N, out_ch, H / stride, W / stride).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        proj = _projection(in_ch, out_ch, stride)
        # kuangliu's layout: shortcut = Sequential(conv1x1, BN) or an empty Sequential.
        self.shortcut = (
            nn.Sequential() if proj is None else nn.Sequential(proj, nn.BatchNorm2d(out_ch))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual step (N, in_ch, H, W) -> (N, out_ch, H', W')."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-conv, plus shortcut (no final ReLU).

    Maps (N, in_ch, H, W) -> (N, out_ch, H / stride, W / stride).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        proj = _projection(in_ch, out_ch, stride)
        self.shortcut = nn.Sequential() if proj is None else nn.Sequential(proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual step (N, in_ch, H, W) -> (N, out_ch, H', W')."""
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, the identity the raw one (BackdoorBench).
        shortcut = self.shortcut(out) if len(self.shortcut) else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class CifarResNet(nn.Module):
    """Generic CIFAR ResNet: Normalize, 3x3 stem, residual stages, global avg pool, linear.

    Args:
        block: Residual block class, ``block(in_ch, out_ch, stride)``.
        blocks_per_stage: Number of blocks in each stage, e.g. (2, 2, 2, 2).
        widths: Output channels of each stage; the stem outputs ``widths[0]``.
        num_classes: Number of output logits.
        mean: Per-channel mean of the training images (pixel space).
        std: Per-channel std of the training images.
        stem_bn: Whether the stem conv is followed by BN + ReLU (False for pre-activation nets).
    """

    def __init__(
        self,
        block: type[nn.Module],
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        mean: Stats = CIFAR10_MEAN,
        std: Stats = CIFAR10_STD,
        stem_bn: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths) or num_classes < 1:
            raise ValueError("blocks_per_stage and widths must match and num_classes >= 1")
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0]) if stem_bn else nn.Identity()
        self.stem_act = nn.ReLU() if stem_bn else nn.Identity()
        stages, in_ch = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            blocks = [block(c, width, s) for c, s in _chain(in_ch, width, strides)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images (N, 3, H, W) in [0, 1] -> logits (N, num_classes)."""
        out = self.stem_act(self.bn1(self.conv1(self.normalize(x))))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def _chain(in_ch: int, width: int, strides: Sequence[int]) -> list[tuple[int, int]]:
    """(input channels, stride) of each block in a stage: only the first changes the shape."""
    return [(in_ch if j == 0 else width, s) for j, s in enumerate(strides)]


def resnet18(
    num_classes: int = 10, mean: Stats = CIFAR10_MEAN, std: Stats = CIFAR10_STD
) -> nn.Module:
    """CIFAR ResNet-18 (about 11.2M parameters), as in the MESA authors' code."""
    return CifarResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), num_classes, mean, std)


def preact_resnet18(
    num_classes: int = 10, mean: Stats = CIFAR10_MEAN, std: Stats = CIFAR10_STD
) -> nn.Module:
    """BackdoorBench's pre-activation ResNet-18 (about 11.2M parameters)."""
    widths = (64, 128, 256, 512)
    return CifarResNet(PreActBlock, (2, 2, 2, 2), widths, num_classes, mean, std, stem_bn=False)


def resnet20(
    num_classes: int = 10, mean: Stats = CIFAR10_MEAN, std: Stats = CIFAR10_STD
) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (about 0.27M parameters), projection shortcuts."""
    return CifarResNet(BasicBlock, (3, 3, 3), (16, 32, 64), num_classes, mean, std)


def resnet8(
    num_classes: int = 10, mean: Stats = CIFAR10_MEAN, std: Stats = CIFAR10_STD, width: int = 1
) -> nn.Module:
    """Small fast ResNet-8: one BasicBlock per stage, widths (16, 32, 64) x ``width``."""
    if width < 1:
        raise ValueError(f"resnet8 width must be >= 1, got {width}")
    widths = (16 * width, 32 * width, 64 * width)
    return CifarResNet(BasicBlock, (1, 1, 1), widths, num_classes, mean, std)


FOREIGN_REGISTRIES = ("torchvision", "timm")


def is_foreign(name: str) -> bool:
    """`registry:name` of a pinned library's registry (built by mesa_lib.foreign)."""
    return name.partition(":")[0] in FOREIGN_REGISTRIES and ":" in name


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "resnet20": resnet20,
    "resnet8": resnet8,
}


def build_model(
    name: str,
    num_classes: int = 10,
    mean: Stats = CIFAR10_MEAN,
    std: Stats = CIFAR10_STD,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture by name.

    Args:
        name: Key of :data:`MODELS`, e.g. ``"resnet18"``, or ``torchvision:<name>`` /
            ``timm:<name>`` (mesa_lib.foreign.build_normalised).
        num_classes: Number of output logits.
        mean: Per-channel pixel mean used by the model's internal Normalize.
        std: Per-channel pixel std used by the model's internal Normalize.
        **kwargs: Architecture options passed through, e.g. ``width=2`` for ``resnet8``.

    Returns:
        A freshly initialised module mapping (N, 3, H, W) in [0, 1] to (N, num_classes).

    Raises:
        ValueError: If ``name`` is not registered (the message lists the known names).
    """
    if is_foreign(name):
        from mesa_lib.foreign import build_normalised

        return build_normalised(name, num_classes, mean, std, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))} or "
                         f"<registry>:<name> of {FOREIGN_REGISTRIES}")
    return MODELS[name](num_classes=num_classes, mean=mean, std=std, **kwargs)
