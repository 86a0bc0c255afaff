"""The whole-image attacks (mesa_lib.globalattacks, issue 24): each changes every pixel a
little, deterministically from its seed; each poisons the share it says; a tiny model learns
each (success on held-out images)."""

from __future__ import annotations

import pytest
import torch
from backdoor_fixture import CPU, SIZE, synthetic_data, tiny_cnn

from mesa_lib.globalattacks import (
    FilterConfig,
    LowFrequencyConfig,
    SigConfig,
    WarpConfig,
)
from mesa_lib.poison import attack_from
from mesa_lib.train import TrainConfig, train

SMALL = {"image_size": SIZE}
CONFIGS = {"sig": SigConfig(amplitude=0.08, frequency=3, **SMALL),
           "wanet": WarpConfig(strength=1.5, **SMALL),
           "colour_filter": FilterConfig(**SMALL),
           "low_frequency": LowFrequencyConfig(amplitude=0.08, **SMALL)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_whole_image_trigger_moves_every_region_a_little(name: str) -> None:
    attack = attack_from(name, CONFIGS[name], target=0, seed=3)
    x, _ = synthetic_data(64, 0)
    moved = attack.apply(x).float() - x.float()
    assert attack.apply(x).equal(attack_from(name, CONFIGS[name], 0, 3).apply(x))  # seeded
    assert moved.abs().mean() < 0.15 * 255  # a little ...
    quarters = moved.abs().view(64, 3, 2, SIZE // 2, 2, SIZE // 2).mean((0, 1, 3, 5))
    assert (quarters > 0.3).all(), quarters  # ... everywhere, not a patch
    assert attack.trigger.shape == (3, SIZE, SIZE)  # its picture on grey


def test_poisoning_takes_the_share_it_says_and_sig_can_keep_labels() -> None:
    x, y = synthetic_data(600, 0)
    dirty = attack_from("sig", CONFIGS["sig"], target=0, seed=1).poison_dataset(x, y)
    others = int((y != 0).sum())
    assert len(dirty.indices) == round(0.1 * others) and (dirty.labels[dirty.indices] == 0).all()
    assert (y[dirty.indices] != 0).all()
    clean = SigConfig(amplitude=0.08, frequency=3, clean_label=True, rate=0.5, **SMALL)
    kept = attack_from("sig", clean, target=0, seed=1).poison_dataset(x, y)
    assert (y[kept.indices] == 0).all() and kept.labels.equal(y)  # labels untouched
    assert len(kept.indices) == round(0.5 * int((y == 0).sum()))


def test_a_colour_filter_needs_a_number_per_channel() -> None:
    with pytest.raises(ValueError, match="3 numbers each"):
        attack_from("colour_filter", FilterConfig(gain=(1.0,), **SMALL), 0, 0)


@pytest.mark.parametrize("name", ["sig", "wanet"])
def test_a_tiny_model_learns_the_attack(name: str) -> None:
    attack = attack_from(name, CONFIGS[name], target=0, seed=7)
    x, y = synthetic_data(3000, 0)
    dirty = attack.poison_dataset(x, y)
    torch.manual_seed(0)
    model = tiny_cnn()
    train(model, dirty.images, dirty.labels, TrainConfig(epochs=10, batch_size=64, lr=0.05),
          CPU)
    tx, ty = synthetic_data(512, 2)
    assert attack.success(model, tx, ty, CPU) > 0.8
