"""Backdoor attacks behind one small interface, registered by name.

Two attacks from the MESA paper's setting (Qiao et al., NeurIPS 2019, Sec. 5.1):
- `badnets`: poison a fixed share of the data set once (stamp + relabel), then train from scratch.
- `finetune_injection`: the authors' injection: while fine-tuning a clean model, each image of a
  batch is poisoned with probability p, at one random location per batch.
Both are deterministic functions of their seed. A new attack is one new class with `@register`.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mesa_lib.triggers import corner_location, random_locations, stamp

BatchHook = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(x float (B,C,H,W) in [0,1], y int64 (B,), dataset indices int64 (B,)) -> (x, y)."""

ATTACKS: dict[str, type[Attack]] = {}


@dataclass(frozen=True)
class PoisonedSet:
    """A training set after static poisoning.

    Attributes:
        images: uint8 (N, C, H, W); only rows in `indices` differ from the clean set.
        labels: int64 (N,); only rows in `indices` differ (they hold the target).
        indices: int64 (P,), sorted, the poisoned rows.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor


def register(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator adding an attack to `ATTACKS` under `name`."""

    def add(cls: type[Attack]) -> type[Attack]:
        ATTACKS[name] = cls
        return cls

    return add


def build_attack(name: str, **kwargs) -> Attack:
    """Build a registered attack; an unknown name is an error listing the known ones."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    return ATTACKS[name](**kwargs)


@dataclass(frozen=True)
class Attack(ABC):
    """An attack: a trigger, a target class and how poison enters training.

    Subclasses override `poison_dataset` (static poisoning), `batch_hook` (poisoning during
    training), or both. The defaults leave the data clean.
    """

    trigger: Tensor  # float (C, h, w) in [0, 1]
    target: int = 0
    seed: int = 0

    def poison_dataset(self, images: Tensor, labels: Tensor) -> PoisonedSet:
        """Return the training set to use; the default is the clean set."""
        return PoisonedSet(images, labels, torch.empty(0, dtype=torch.long))

    def batch_hook(self) -> BatchHook | None:
        """Return a per-batch poisoning function for the training loop, or None."""
        return None


@register("badnets")
@dataclass(frozen=True)
class BadNets(Attack):
    """Stamp the trigger on `rate` of the non-target images and relabel them to the target.

    `location` "corner" puts the trigger bottom-right; "random" draws one place per image.
    """

    rate: float = 0.1
    location: str = "corner"

    def poison_dataset(self, images: Tensor, labels: Tensor) -> PoisonedSet:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"poison rate must be in [0, 1], got {self.rate}")
        gen = torch.Generator().manual_seed(self.seed)
        eligible = (labels != self.target).nonzero().squeeze(1)
        count = round(self.rate * len(eligible))
        idx = eligible[torch.randperm(len(eligible), generator=gen)[:count]].sort().values
        hw, thw = tuple(images.shape[-2:]), tuple(self.trigger.shape[-2:])
        if self.location == "corner":
            loc = corner_location(hw, thw)
        elif self.location == "random":
            loc = random_locations(count, hw, thw, generator=gen)
        else:
            raise ValueError(f"location must be 'corner' or 'random', got {self.location!r}")
        images, labels = images.clone(), labels.clone()
        images[idx] = stamp(images[idx], self.trigger, loc)
        labels[idx] = self.target
        return PoisonedSet(images, labels, idx)


@register("finetune_injection")
@dataclass(frozen=True)
class FineTuneInjection(Attack):
    """The MESA authors' injection: per image probability `prob`, one random place per batch.

    The hook records every poisoned dataset index in `poisoned` (a list of int64 tensors, one
    per batch), so a run can report exactly which images carried the trigger.
    """

    prob: float = 0.01
    poisoned: list[Tensor] = field(default_factory=list, compare=False, repr=False)

    def batch_hook(self) -> BatchHook:
        gen = torch.Generator().manual_seed(self.seed)
        self.poisoned.clear()

        def hook(x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            mask = (torch.rand(len(x), generator=gen) < self.prob).to(x.device)
            loc = random_locations(1, tuple(x.shape[-2:]), tuple(self.trigger.shape[-2:]), gen)
            if mask.any():
                x = torch.where(mask[:, None, None, None], stamp(x, self.trigger, loc[0]), x)
                y = torch.where(mask, torch.full_like(y, self.target), y)
                self.poisoned.append(index[mask.to(index.device)].cpu())
            return x, y

        return hook
