"""Backdoor attacks whose trigger is not a patch (issue 24), in the attack registry of
mesa_lib.poison. Importing this module registers them; the zoo and the pipeline do not import
it yet (their running jobs would restart), so today they serve the tests and the scanner's
development.

- `sig`: SIG (Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoid of amplitude `amplitude`
  and `frequency` periods across the image added to every pixel; `clean_label` poisons only
  target-class images and keeps their labels (the paper's setting), else `rate` of the others
  are relabelled.
- `wanet`: WaNet (Nguyen & Tran, ICLR 2021): every image warped by one fixed smooth random field
  (a k x k grid upsampled bicubically) of at most `strength` pixels.
- `colour_filter`: a per-channel gain and tint over the whole image (TrojAI's filter triggers).
- `low_frequency`: a fixed smooth random pattern (a k x k grid upsampled) added with amplitude
  `amplitude` (the low-frequency triggers of Zeng et al., ICCV 2021).

Each is a deterministic function of its seed, poisons `rate` of the non-target images once
(static, relabelled to the target, as BadNets) unless `clean_label`, and measures its success
with `apply` on uint8 images. Its `trigger` tensor is what the trigger does to a mid-grey image
(C, H, W), for records and pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mesa_lib.poison import Attack, PoisonedSet, register


@dataclass(frozen=True)
class GlobalConfig:
    """Settings shared by the whole-image attacks.

    Attributes:
        rate: share of the non-target images poisoned and relabelled.
        image_size: side of the (square) images the trigger is made for.
        channels: image channels.
    """

    rate: float = field(default=0.1, metadata={"ge": 0, "le": 1})
    image_size: int = field(default=32, metadata={"ge": 4})
    channels: int = field(default=3, metadata={"ge": 1})


@dataclass(frozen=True)
class SigConfig(GlobalConfig):
    """SIG: amplitude in pixel units ([0, 1]; 20/255 in the paper), periods across the width,
    and whether only target-class images are poisoned, labels kept."""

    amplitude: float = field(default=20 / 255, metadata={"gt": 0, "le": 1})
    frequency: float = field(default=6.0, metadata={"gt": 0})
    clean_label: bool = False


@dataclass(frozen=True)
class WarpConfig(GlobalConfig):
    """WaNet: the warp's grid side and its largest displacement in pixels."""

    grid: int = field(default=4, metadata={"ge": 2})
    strength: float = field(default=1.0, metadata={"gt": 0})


@dataclass(frozen=True)
class FilterConfig(GlobalConfig):
    """A colour filter: x' = gain * x + tint, per channel (lists of `channels` numbers)."""

    gain: tuple[float, ...] = (1.0, 0.8, 0.8)
    tint: tuple[float, ...] = (0.1, 0.0, 0.0)


@dataclass(frozen=True)
class LowFrequencyConfig(GlobalConfig):
    """A smooth random additive pattern: its grid side and amplitude (pixel units)."""

    grid: int = field(default=4, metadata={"ge": 2})
    amplitude: float = field(default=0.06, metadata={"gt": 0, "le": 1})


def _grey(channels: int, size: int) -> Tensor:
    return torch.full((channels, size, size), 0.5)


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass(frozen=True)
class GlobalAttack(Attack):
    """An attack that transforms the whole image (`transform`: float (N, C, H, W) -> same)."""

    rate: float = 0.1
    clean_label: bool = False

    @property
    def static_rate(self) -> float:
        return self.rate

    def transform(self, x: Tensor) -> Tensor:
        """The trigger on float images (N, C, H, W) in [0, 1]."""
        raise NotImplementedError

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return _to_uint8(self.transform(images.float() / 255))

    def poison_dataset(self, images: Tensor, labels: Tensor) -> PoisonedSet:
        gen = torch.Generator().manual_seed(self.seed)
        if self.clean_label:  # only target-class images carry it; labels stay true
            pool = (labels == self.target).nonzero().squeeze(1)
        else:
            pool = (labels != self.target).nonzero().squeeze(1)
        count = round(self.rate * len(pool))
        idx = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
        images, labels = images.clone(), labels.clone()
        images[idx] = self.apply(images[idx])
        labels[idx] = self.target
        return PoisonedSet(images, labels, idx)


@register("sig", SigConfig)
@dataclass(frozen=True)
class Sig(GlobalAttack):
    """Additive horizontal sinusoid (module docstring)."""

    amplitude: float = 20 / 255
    frequency: float = 6.0

    @classmethod
    def from_config(cls, config: SigConfig, target: int, seed: int) -> Sig:
        made = cls(trigger=torch.zeros(1), target=target, seed=seed, rate=config.rate,
                   clean_label=config.clean_label, amplitude=config.amplitude,
                   frequency=config.frequency)
        return _with_picture(made, config)

    def transform(self, x: Tensor) -> Tensor:
        w = x.shape[-1]
        wave = self.amplitude * torch.sin(2 * math.pi * self.frequency *
                                          torch.arange(w, dtype=x.dtype) / w)
        return (x + wave.to(x.device)).clamp(0, 1)


def _smooth(seed: int, channels: int, grid: int, size: int, mode: str = "bicubic") -> Tensor:
    """A seeded smooth random field (channels, size, size) scaled to max |value| = 1."""
    coarse = torch.rand(1, channels, grid, grid, generator=torch.Generator().manual_seed(seed))
    field_ = F.interpolate(coarse * 2 - 1, size=(size, size), mode=mode, align_corners=True)[0]
    return field_ / field_.abs().max().clamp_min(1e-12)


@register("wanet", WarpConfig)
@dataclass(frozen=True)
class WaNet(GlobalAttack):
    """A fixed smooth warp (module docstring)."""

    flow: Tensor = field(default_factory=lambda: torch.zeros(2, 1, 1))  # (2, H, W), pixels

    @classmethod
    def from_config(cls, config: WarpConfig, target: int, seed: int) -> WaNet:
        flow = config.strength * _smooth(seed, 2, config.grid, config.image_size)
        made = cls(trigger=torch.zeros(1), target=target, seed=seed, rate=config.rate,
                   flow=flow)
        return _with_picture(made, config)

    def transform(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        scale = torch.tensor([2 / (w - 1), 2 / (h - 1)], dtype=x.dtype).view(2, 1, 1)
        shift = (self.flow.to(x.dtype) * scale).permute(1, 2, 0)              # (H, W, 2)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, dtype=x.dtype),
                                torch.linspace(-1, 1, w, dtype=x.dtype), indexing="ij")
        grid = (torch.stack([xs, ys], -1) + shift).clamp(-1, 1)
        grid = grid[None].expand(n, h, w, 2).to(x.device)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=True)


@register("colour_filter", FilterConfig)
@dataclass(frozen=True)
class ColourFilter(GlobalAttack):
    """x' = gain * x + tint, per channel."""

    gain: tuple[float, ...] = (1.0, 0.8, 0.8)
    tint: tuple[float, ...] = (0.1, 0.0, 0.0)

    @classmethod
    def from_config(cls, config: FilterConfig, target: int, seed: int) -> ColourFilter:
        if not len(config.gain) == len(config.tint) == config.channels:
            raise ValueError(f"colour_filter: gain {config.gain} and tint {config.tint} need "
                             f"{config.channels} numbers each")
        made = cls(trigger=torch.zeros(1), target=target, seed=seed, rate=config.rate,
                   gain=tuple(config.gain), tint=tuple(config.tint))
        return _with_picture(made, config)

    def transform(self, x: Tensor) -> Tensor:
        gain = torch.tensor(self.gain, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        tint = torch.tensor(self.tint, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * gain + tint).clamp(0, 1)


@register("low_frequency", LowFrequencyConfig)
@dataclass(frozen=True)
class LowFrequency(GlobalAttack):
    """A fixed smooth additive pattern (module docstring)."""

    pattern: Tensor = field(default_factory=lambda: torch.zeros(3, 1, 1))  # (C, H, W)

    @classmethod
    def from_config(cls, config: LowFrequencyConfig, target: int, seed: int) -> LowFrequency:
        pattern = config.amplitude * _smooth(seed, config.channels, config.grid,
                                             config.image_size, "bilinear")
        made = cls(trigger=torch.zeros(1), target=target, seed=seed, rate=config.rate,
                   pattern=pattern)
        return _with_picture(made, config)

    def transform(self, x: Tensor) -> Tensor:
        return (x + self.pattern.to(x.device, x.dtype)).clamp(0, 1)


def _with_picture(attack: GlobalAttack, config: GlobalConfig) -> GlobalAttack:
    """The attack with `trigger` set to its effect on a mid-grey image (C, H, W)."""
    from dataclasses import replace

    grey = _grey(config.channels, config.image_size)[None]
    return replace(attack, trigger=attack.transform(grey)[0])
