"""A tiny backdoored classifier built in seconds on CPU, for the MESA tests.

Synthetic 3x16x16 images: class k is a smooth random colour template (a 4x4 grid upsampled) plus
uniform noise, so the class evidence is spread over the whole image and a 3x3 patch cannot easily
hijack a clean model. Every image also carries a few random black/white 3x3 patches (clutter), so
the backdoor must learn ITS pattern rather than "any high-contrast patch". The backdoor is BadNets
with the demo 3x3 pattern at random places, relabelled to class 0 (mesa_lib.poison + train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.poison import build_attack
from mesa_lib.train import TrainConfig, train
from mesa_lib.triggers import DEMO_PATTERN, pattern_trigger, random_locations, stamp

CPU = torch.device("cpu")
CLASSES = 6
SIZE = 16
TRIGGER = pattern_trigger(DEMO_PATTERN)  # (3, 3, 3) in {0, 1}
TARGET = 0
CLUTTER = 2
RATE = 0.1


def templates(classes: int = CLASSES, seed: int = 1234) -> Tensor:
    """Smooth class templates: float (classes, 3, SIZE, SIZE) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def synthetic_data(n: int, seed: int, classes: int = CLASSES) -> tuple[Tensor, Tensor]:
    """uint8 images (n, 3, SIZE, SIZE) and int64 labels (n,) of the template task."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    noise = torch.rand(n, 3, SIZE, SIZE, generator=g)
    x = 0.6 * templates(classes)[y] + 0.4 * noise
    for _ in range(CLUTTER):  # random b/w 3x3 patches: the backdoor must learn ITS pattern
        patches = (torch.rand(n, 1, 3, 3, generator=g) < 0.5).float().expand(-1, 3, -1, -1)
        x = stamp(x, patches, random_locations(n, (SIZE, SIZE), (3, 3), g))
    return (x * 255).round().to(torch.uint8), y


def tiny_cnn(classes: int = CLASSES) -> nn.Module:
    """Conv-BN-ReLU x3 with pooling; float (B, 3, H, W) in [0, 1] -> logits (B, classes)."""
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


@dataclass(frozen=True)
class Lab:
    """A trained tiny model with its defender (train) and held-out (test) data."""

    model: nn.Module
    defender_x: Tensor
    defender_y: Tensor
    test_x: Tensor
    test_y: Tensor


def build_lab(backdoor: bool, seed: int = 0, n_train: int = 4000, epochs: int = 15,
              classes: int = CLASSES, trigger: Tensor = TRIGGER, location: str = "random",
              alpha: float = 1.0, target: int = TARGET, n_defender: int = 1024,
              second: tuple[Tensor, str, int] | None = None) -> Lab:
    """Train the tiny CNN, with a BadNets backdoor (10% of images, `trigger` at `location`,
    blended by `alpha`) or clean; `second` = (trigger, location, target) plants another."""
    x, y = synthetic_data(n_train, seed, classes)
    dx, dy = synthetic_data(n_defender, seed + 1, classes)
    tx, ty = synthetic_data(1024, seed + 2, classes)
    plants = [(trigger, location, target)] if backdoor else []
    for i, (trig, place, tgt) in enumerate(plants + ([second] if second else [])):
        attack = build_attack("badnets", trigger=trig, target=tgt, rate=RATE, location=place,
                              alpha=alpha, seed=seed + 100 * i)
        ps = attack.poison_dataset(x, y)
        x, y = ps.images, ps.labels
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, augment=False, seed=seed)
    model = train(tiny_cnn(classes), x, y, cfg, CPU)
    return Lab(model.eval(), dx, dy, tx, ty)
