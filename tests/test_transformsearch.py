"""The whole-image transformation search (mesa_lib.transformsearch, issue 24): on tiny models
trained here with triggers that are not patches, a backdoor's target needs a much smaller
transformation than every other class; a clean model has no such class.

Bounds: on this machine (2026-12-05) the target's size was 0.54-0.56 of the next smallest class's
(SIG sinusoid, smooth warp), a clean model's smallest 0.92 of its next: the bound 0.75 sits between
with room for float differences between CPUs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from backdoor_fixture import CPU, SIZE, synthetic_data, tiny_cnn

from mesa_lib.train import TrainConfig, train
from mesa_lib.transformsearch import TransformSearchConfig, transform_search

BOUND = 0.75
CONFIG = TransformSearchConfig(steps=300)


def sinusoid(x: torch.Tensor) -> torch.Tensor:
    """SIG's trigger: a horizontal sinusoid of amplitude 20/255 added to uint8 images."""
    wave = 0.08 * torch.sin(2 * math.pi * torch.arange(SIZE).float() * 3 / SIZE)
    return ((x.float() / 255 + wave).clamp(0, 1) * 255).round().to(torch.uint8)


def warp(x: torch.Tensor) -> torch.Tensor:
    """WaNet's trigger: a fixed smooth random warp of at most 1.5 pixels."""
    f = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    flow = F.interpolate(f / f.abs().max(), size=(SIZE, SIZE), mode="bicubic",
                         align_corners=True).permute(0, 2, 3, 1) * (2 * 1.5 / SIZE)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE),
                            indexing="ij")
    grid = (torch.stack([xs, ys], -1)[None] + flow).clamp(-1, 1).expand(len(x), -1, -1, -1)
    out = F.grid_sample(x.float() / 255, grid, align_corners=True)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def lab(trigger=None, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny CNN trained on the template task, 10% poisoned by `trigger` to class 0 (None:
    clean); with the defender's 512 clean images."""
    x, y = synthetic_data(3000, seed)
    if trigger is not None:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:300]
        x, y = x.clone(), y.clone()
        x[idx], y[idx] = trigger(x[idx]), 0
    torch.manual_seed(seed)
    model = tiny_cnn()
    train(model, x, y, TrainConfig(epochs=10, batch_size=64, lr=0.05, seed=seed), CPU)
    return model.eval(), synthetic_data(512, seed + 1)[0]


def ratio(sizes: torch.Tensor, k: int) -> float:
    """Class k's size over the smallest of the other classes'."""
    others = torch.cat([sizes[:k], sizes[k + 1:]])
    return float(sizes[k] / others.min())


@pytest.mark.parametrize("trigger", [sinusoid, warp], ids=["sinusoid", "warp"])
def test_a_whole_image_backdoor_needs_the_smallest_transformation(trigger) -> None:
    model, images = lab(trigger)
    found = transform_search(model, images, tuple(range(6)), CONFIG, CPU)
    assert ratio(found.size, 0) < BOUND, found.size
    assert int(found.anomaly().argmin()) == 0


def test_a_clean_model_has_no_class_far_below_the_others() -> None:
    model, images = lab(None)
    found = transform_search(model, images, tuple(range(6)), CONFIG, CPU)
    smallest = int(found.size.argmin())
    assert ratio(found.size, smallest) >= BOUND, found.size


def test_unknown_families_are_refused() -> None:
    with pytest.raises(ValueError, match="known"):
        TransformSearchConfig(families=("swirl",))
