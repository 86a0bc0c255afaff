"""The whole-image transformation search (mesa_lib.transformsearch, issue 24): on tiny models
trained here with the registered whole-image attacks (mesa_lib.globalattacks), a backdoor's
target needs a much smaller transformation than every other class; a clean model has no such
class.

Bounds: on this machine (2026-12-05) the target's size was 0.55 (SIG), 0.53 (WaNet) and 0.30
(low-frequency) of the next smallest class's, a clean model's smallest 0.92 of its next: the
bound 0.75 sits between with room for float differences between CPUs. A colour-filter backdoor
gave 0.97 (not separated: this task's classes are colour templates), so it is not asserted."""

from __future__ import annotations

import pytest
import torch
from backdoor_fixture import CPU, synthetic_data, tiny_cnn
from test_globalattacks import CONFIGS

from mesa_lib.poison import attack_from
from mesa_lib.train import TrainConfig, train
from mesa_lib.transformsearch import TransformSearchConfig, transform_search

BOUND = 0.75
CONFIG = TransformSearchConfig(steps=300)


def lab(attack: str | None = None, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny CNN trained on the template task, 10% of the other classes poisoned by the
    registered whole-image attack `attack` to class 0 (None: clean); with the defender's 512
    clean images."""
    x, y = synthetic_data(3000, seed)
    if attack is not None:
        dirty = attack_from(attack, CONFIGS[attack], target=0, seed=7).poison_dataset(x, y)
        x, y = dirty.images, dirty.labels
    torch.manual_seed(seed)
    model = tiny_cnn()
    train(model, x, y, TrainConfig(epochs=10, batch_size=64, lr=0.05, seed=seed), CPU)
    return model.eval(), synthetic_data(512, seed + 1)[0]


def ratio(sizes: torch.Tensor, k: int) -> float:
    """Class k's size over the smallest of the other classes'."""
    others = torch.cat([sizes[:k], sizes[k + 1:]])
    return float(sizes[k] / others.min())


@pytest.mark.parametrize("attack", ["sig", "wanet", "low_frequency"])
def test_a_whole_image_backdoor_needs_the_smallest_transformation(attack: str) -> None:
    model, images = lab(attack)
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
