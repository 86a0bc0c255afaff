"""Model repair: fine-tune on the defender's data with sampled triggers and TRUE labels.

Qiao, Yang, Li, NeurIPS 2019, Sec. 4.3: once the trigger distribution is recovered, the backdoor
is removed by fine-tuning the model on clean data where images carry triggers drawn from the
distribution but keep their true labels, so no trigger of the distribution predicts the target
any longer. The authors' code: SGD lr 1e-3, momentum 0.9, batch 128, 10 epochs, each image
stamped at a random place with probability 1%. The rate is a parameter (`stamp_rate`): the
reproduction pipeline (reproduce/, docs/reproduction.md) chooses it on a validation split and
measures the authors' 0.01 beside it.

Repair is a `BatchHook` for `mesa_lib.train.train`; the same function gives the controls:
`sampler=None` is plain fine-tuning (no trigger), `ConstantSampler(true_trigger)` the oracle,
`UniformPatch` random patches. Every sampler is drawn noise-free and then given the same
`sample_noise` (0 by default, as in the authors' repair), so no method gets noise another does
not. What is stamped is a `mesa_lib.geometry.Family`: a sampler's patterns at random places (the
paper's), or placed by the geometry a scan recovered, or Neural Cleanse's `MaskTrigger` over the
whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mesa_lib.distribution import TriggerSampler
from mesa_lib.geometry import Family, Placed
from mesa_lib.seed import derive_seed
from mesa_lib.train import BatchHook, EpochCallback, TrainConfig, train

SampleFn = Callable[[int, torch.Generator], Tensor]
"""(n, generator) -> triggers (n, C, h, w) float in [0, 1]."""


@dataclass(frozen=True)
class RepairConfig:
    """Fine-tuning settings of the repair; defaults follow the MESA authors' code.

    Attributes:
        epochs, batch_size, lr, momentum, weight_decay: SGD fine-tuning (constant lr).
        stamp_rate: probability that an image of a batch carries a sampled trigger.
        augment: random crop + flip before stamping (as when training the model).
        sample_noise: std of Gaussian noise added to every sampled trigger (then clamped).
        seed: seed of the batch order, augmentation, stamping and trigger draws.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    stamp_rate: float = 0.5
    augment: bool = True
    sample_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.stamp_rate <= 1:
            raise ValueError(f"stamp_rate must be in [0, 1], got {self.stamp_rate}")
        if self.sample_noise < 0:
            raise ValueError(f"sample_noise must be >= 0, got {self.sample_noise}")

    def train_config(self) -> TrainConfig:
        """The equivalent `TrainConfig` (constant lr, no Nesterov)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           momentum=self.momentum, nesterov=False,
                           weight_decay=self.weight_decay, schedule="constant",
                           augment=self.augment, seed=self.seed)


def as_family(sampler: SampleFn | TriggerSampler | Family, sample_noise: float = 0.0) -> Family:
    """What a repair stamps, as a `Family`: a family or a full-image `MaskTrigger` as it is, a
    sampler of patterns (or a bare `(n, generator)` function) put at random places."""
    if hasattr(sampler, "apply"):
        return sampler
    if not hasattr(sampler, "sample"):
        sampler = _FunctionSampler(sampler)
    return Placed(sampler, None, sample_noise)


@dataclass(frozen=True)
class _FunctionSampler:
    fn: SampleFn

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.fn(n, generator)


def repair_hook(
    sampler: SampleFn | TriggerSampler | Family, stamp_rate: float, seed: int,
    sample_noise: float = 0.0,
) -> BatchHook:
    """A BatchHook putting sampled triggers on a random `stamp_rate` share of each batch.

    Each selected image gets its own trigger, placed by its family (a sampler's patterns at
    random places; a geometry's place; a `MaskTrigger` over the whole image); labels unchanged.
    """
    gen = torch.Generator().manual_seed(seed)
    family = as_family(sampler, sample_noise)

    def hook(x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        chosen = (torch.rand(len(x), generator=gen) < stamp_rate).nonzero().squeeze(1)
        if len(chosen) == 0:
            return x, y
        idx = chosen.to(x.device)
        x = x.clone()
        x[idx] = family.apply(x[idx], gen)
        return x, y

    return hook


def repair(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    sampler: SampleFn | TriggerSampler | Family | None,
    config: RepairConfig,
    device: torch.device,
    callback: EpochCallback | None = None,
) -> nn.Module:
    """Fine-tune `model` IN PLACE on the defender's data with sampled triggers, true labels.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits.
        images: defender's images, uint8 (N, C, H, W); labels: int64 (N,) true classes.
        sampler: `(n, generator) -> (n, C, h, w)` triggers, or an object with such a `sample`
            (`TriggerDistribution`, `PointDistribution`, `ConstantSampler`, `UniformPatch`),
            stamped at random places, or a `Family` with `apply` (a sampler placed by a
            recovered geometry, a `Mixture` over targets, a `MaskTrigger`); None = no trigger.
        config: fine-tuning settings.
        device: where to train.
        callback: per-epoch `EpochStats` callback of `mesa_lib.train.train`.

    Returns:
        The same model, fine-tuned, in eval mode.
    """
    hook = None
    if sampler is not None and config.stamp_rate > 0:
        seed = derive_seed(config.seed, "repair_stamps")
        hook = repair_hook(sampler, config.stamp_rate, seed, config.sample_noise)
    return train(model, images, labels, config.train_config(), device, hook, callback)
