"""Backdoor attacks behind one small interface, registered by name.

Two attacks from the MESA paper's setting (Qiao et al., NeurIPS 2019, Sec. 5.1):
- `badnets`: poison a fixed share of the data set once (stamp + relabel), then train from scratch.
- `finetune_injection`: the authors' injection: while fine-tuning a clean model, each image of a
  batch is poisoned with probability p, at one random location per batch.
Both are deterministic functions of their seed. Where the trigger goes is a `location`: "random",
"corner" (bottom-right, BadNets' classic place) or a fixed "R,C" (top-left row and column); with
`alpha` < 1 the trigger is blended in (a full-image trigger at "0,0" is the blended attack of
Chen et al. 2017).

A registry entry is a name, a frozen config dataclass (the attack's settings, defaults and bounds
in `field(metadata=...)`; params files give a block checked against it) and the Attack class,
whose `from_config(config, target, seed)` builds it, `poison_dataset` / `batch_hook` say how it
poisons and `apply` / `success` how its success is measured. A new attack is one module with one
`@register(name, Config)` class.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from mesa_lib import plugins
from mesa_lib.evaluate import predict
from mesa_lib.train import BatchHook
from mesa_lib.triggers import build_trigger, corner_location, random_locations, stamp

ATTACKS: dict[str, type[Attack]] = {}
LOCATION = r"^(random|corner|\d+,\d+)$"
FIXED_3X3 = ("demo", "pattern")  # trigger kinds whose size is fixed


@dataclass(frozen=True)
class PatchConfig:
    """A patch trigger and where it goes (BadNets and the fine-tune injection).

    Attributes:
        trigger: a kind of mesa_lib.triggers ("bw", "random_color", "demo", "pattern:K").
        size: side of the trigger (random kinds; the 3x3 patterns ignore it); 32 = the image.
        location: "random", "corner" (bottom-right) or "R,C" (fixed top-left).
        rate: BadNets: share of the non-target images poisoned; injection: per-image
            probability in each batch.
        alpha: < 1 blends the trigger in.
    """

    trigger: str = "bw"
    size: int = field(default=3, metadata={"ge": 1, "le": 32})
    location: str = field(default="random", metadata={"pattern": LOCATION})
    rate: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    alpha: float = field(default=1.0, metadata={"gt": 0, "le": 1})

    def __post_init__(self) -> None:
        kind = self.trigger.partition(":")[0]
        try:
            build_trigger(self.trigger, self.size)  # a bad kind or argument names itself
        except ValueError as err:
            raise ValueError(f"trigger: {err}") from None
        if kind in FIXED_3X3 and self.size != 3:
            raise ValueError(f"size: {self.trigger} is a 3x3 pattern, got {self.size}")

    def trigger_tensor(self, seed: int, channels: int = 3) -> Tensor:
        """The trigger (C, size, size) in [0, 1], drawn from `seed`."""
        return build_trigger(self.trigger, self.size, channels, seed)


@dataclass(frozen=True)
class BadNetsConfig(PatchConfig):
    """BadNets' defaults: 10% of the non-target images, the patch at the bottom-right corner."""

    location: str = field(default="corner", metadata={"pattern": LOCATION})


@dataclass(frozen=True)
class InjectionConfig(PatchConfig):
    """The authors' injection defaults: each batch image poisoned with probability 1%."""

    rate: float = field(default=0.01, metadata={"ge": 0, "le": 1})


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


def place(location: str, n: int, image_hw: tuple[int, int], trigger_hw: tuple[int, int],
          generator: torch.Generator) -> Tensor:
    """Top-left corners for n triggers: int64 (n, 2) for "random", (2,) for a fixed place.

    Args:
        location: "random" (one uniform place per trigger), "corner" (bottom-right) or "R,C".
    """
    if location == "random":
        return random_locations(n, image_hw, trigger_hw, generator=generator)
    if location == "corner":
        return corner_location(image_hw, trigger_hw)
    try:
        row, col = (int(v) for v in location.split(","))
    except ValueError:
        raise ValueError(
            f"location must be 'random', 'corner' or 'R,C', got {location!r}") from None
    if not (0 <= row <= image_hw[0] - trigger_hw[0] and 0 <= col <= image_hw[1] - trigger_hw[1]):
        raise ValueError(f"location {location!r} puts the {trigger_hw} trigger outside {image_hw}")
    return torch.tensor([row, col])


def register(name: str, config: type = PatchConfig) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator adding an attack to `ATTACKS` under `name`, with its config dataclass."""

    def add(cls: type[Attack]) -> type[Attack]:
        cls.name, cls.config = name, config
        ATTACKS[name] = cls
        return cls

    return add


def attack_class(name: str) -> type[Attack]:
    """The registered attack `name`; an unknown name is an error listing the known ones."""
    if name not in ATTACKS and not plugins.load(plugins.ATTACKS, name):
        known = sorted(set(ATTACKS) | plugins.names(plugins.ATTACKS))
        raise ValueError(f"unknown attack {name!r}; known: {known}")
    return ATTACKS[name]


def registered() -> dict[str, type[Attack]]:
    """Every attack: the registry with all the plug-ins of the entry points loaded."""
    plugins.load_all(plugins.ATTACKS)
    return dict(ATTACKS)


def build_attack(name: str, **kwargs) -> Attack:
    """Build a registered attack from its fields (trigger tensor, target, seed, ...)."""
    return attack_class(name)(**kwargs)


def attack_from(name: str, config: object, target: int, seed: int) -> Attack:
    """Build a registered attack from its config: the trigger and every draw from `seed`."""
    return attack_class(name).from_config(config, target, seed)


@dataclass(frozen=True)
class Attack(ABC):
    """An attack: a trigger, a target class and how poison enters training.

    Subclasses override `poison_dataset` (static poisoning), `batch_hook` (poisoning during
    training), or both. The defaults leave the data clean.
    """

    trigger: Tensor  # float (C, h, w) in [0, 1]
    target: int = 0
    seed: int = 0
    name: ClassVar[str] = ""  # set by @register, with `config`
    config: ClassVar[type] = PatchConfig

    @classmethod
    def from_config(cls, config: PatchConfig, target: int, seed: int) -> Attack:
        """The attack of a patch config (other configs override this)."""
        return cls(trigger=config.trigger_tensor(seed), target=target, seed=seed,
                   **cls.config_fields(config))

    @classmethod
    def config_fields(cls, config: PatchConfig) -> dict[str, object]:
        """This class's own fields taken from the config (subclasses name theirs)."""
        return {}

    @property
    def static_rate(self) -> float:
        """Share of the non-target images `poison_dataset` poisons (0: none, or in batches)."""
        return 0.0

    @property
    def batch_rate(self) -> float:
        """Share of each batch's images `batch_hook` poisons (0: it has none)."""
        return 0.0

    def poison_dataset(self, images: Tensor, labels: Tensor) -> PoisonedSet:
        """Return the training set to use; the default is the clean set."""
        return PoisonedSet(images, labels, torch.empty(0, dtype=torch.long))

    def batch_hook(self) -> BatchHook | None:
        """Return a per-batch poisoning function for the training loop, or None."""
        return None

    def apply(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The trigger as planted, on uint8 images (N, C, H, W) -> uint8 (N, C, H, W)."""
        location = getattr(self, "location", "random")
        loc = place(location, len(images), tuple(images.shape[-2:]),
                    tuple(self.trigger.shape[-2:]), generator)
        return stamp(images, self.trigger, loc, getattr(self, "alpha", 1.0))

    def success(self, model: nn.Module, images: Tensor, labels: Tensor,
                device: torch.device) -> float:
        """Attack success rate: the share of the non-target images (uint8 (N, C, H, W),
        labels (N,)) that `apply` (seeded by the attack's seed) sends to the target."""
        x = images[labels != self.target]
        if len(x) == 0:
            return 0.0
        stamped = self.apply(x, torch.Generator().manual_seed(self.seed))
        return float((predict(model, stamped, device) == self.target).float().mean())


@register("badnets", BadNetsConfig)
@dataclass(frozen=True)
class BadNets(Attack):
    """Stamp the trigger on `rate` of the non-target images and relabel them to the target.

    `location` "corner" puts the trigger bottom-right, "random" draws one place per image, "R,C"
    is a fixed place; `alpha` < 1 blends the trigger in.
    """

    rate: float = 0.1
    location: str = "corner"
    alpha: float = 1.0

    @classmethod
    def config_fields(cls, config: PatchConfig) -> dict[str, object]:
        return {"rate": config.rate, "location": config.location, "alpha": config.alpha}

    @property
    def static_rate(self) -> float:
        return self.rate

    def poison_dataset(self, images: Tensor, labels: Tensor) -> PoisonedSet:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"poison rate must be in [0, 1], got {self.rate}")
        gen = torch.Generator().manual_seed(self.seed)
        eligible = (labels != self.target).nonzero().squeeze(1)
        count = round(self.rate * len(eligible))
        idx = eligible[torch.randperm(len(eligible), generator=gen)[:count]].sort().values
        hw, thw = tuple(images.shape[-2:]), tuple(self.trigger.shape[-2:])
        loc = place(self.location, count, hw, thw, gen)
        images, labels = images.clone(), labels.clone()
        images[idx] = stamp(images[idx], self.trigger, loc, self.alpha)
        labels[idx] = self.target
        return PoisonedSet(images, labels, idx)


@register("finetune_injection", InjectionConfig)
@dataclass(frozen=True)
class FineTuneInjection(Attack):
    """The MESA authors' injection: per image probability `prob`, one random place per batch
    (or a fixed `location` "corner" / "R,C"); `alpha` < 1 blends the trigger in.

    The hook records every poisoned dataset index in `poisoned` (a list of int64 tensors, one
    per batch), so a run can report exactly which images carried the trigger.
    """

    prob: float = 0.01
    location: str = "random"
    alpha: float = 1.0
    poisoned: list[Tensor] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def config_fields(cls, config: PatchConfig) -> dict[str, object]:
        return {"prob": config.rate, "location": config.location, "alpha": config.alpha}

    @property
    def batch_rate(self) -> float:
        return self.prob

    def batch_hook(self) -> BatchHook:
        gen = torch.Generator().manual_seed(self.seed)
        self.poisoned.clear()

        def hook(x: Tensor, y: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
            mask = (torch.rand(len(x), generator=gen) < self.prob).to(x.device)
            loc = place(self.location, 1, tuple(x.shape[-2:]), tuple(self.trigger.shape[-2:]),
                        gen).view(-1, 2)[0]
            if mask.any():
                x = torch.where(mask[:, None, None, None],
                                stamp(x, self.trigger, loc, self.alpha), x)
                y = torch.where(mask, torch.full_like(y, self.target), y)
                self.poisoned.append(index[mask.to(index.device)].cpu())
            return x, y

        return hook
