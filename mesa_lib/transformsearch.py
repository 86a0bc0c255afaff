"""The smallest universal input transformation that sends images to a class: a search for
triggers that are not patches, and the scan's `transform` detector (issue 24).

The mask search (mesa_lib.masksearch, Neural Cleanse's objective) finds the smallest *patch*.
Triggers that change every pixel a little have no small patch: a smooth warp (WaNet, Nguyen &
Tran, ICLR 2021), an additive sinusoid (SIG, Barni et al., ICIP 2019), a low-frequency pattern
(Zeng et al., ICCV 2021) or a colour filter (the filter triggers of TrojAI's image rounds). This
search asks the same question for three families of whole-image transformations T: for each
class k, the T of least *size* such that the model calls T(x) k for most clean images x
(cross-entropy to k plus lambda x size, lambda raised after every successful step and lowered
after a failed one: Neural Cleanse's rule, mesa_lib.masksearch). A backdoored target needs a
much smaller T than the other classes, as a patch backdoor's target needs a smaller mask.

Families (each bounded by construction, all K classes searched together):
- `additive`: x + up(d), d a (C, g, g) grid upsampled bilinearly: low-frequency patterns, SIG;
- `colour`: M x + b per pixel, M (C, C) and b (C,): colour filters, tints, gains;
- `warp`: x sampled at identity + up(f), f a (2, g, g) grid of displacements: smooth warps.

The size of a T is the RMS change it makes to the images (pixel values in [0, 1]), the same
measure for every family, so one class's smallest transformation over the families is its
score. `anomaly_index` of the sizes (small = negative) reads like Neural Cleanse's.

As the detector `transform` (registered below, found by the scan through the entry point of
pyproject.toml): class score = median log size over the classes minus the class's log size
(the mask detector's score, with the transformation's size for the mask's L1). The trigger a
repair uses against a flagged class is its smallest transformation; its geometry `transform`
makes a trigger of a family's parameter grid, in [0, 1] as MESA's generators give them (additive
(C, g, g): a change of r (2t - 1); warp (2, g, g): a shift of max_shift (2t - 1) pixels; colour
(1, C, C + 1): a matrix I + r (2t - 1) and an offset r (2t - 1) / 2; the reach r is REACH times
the recovered transformation's size, at most max_add), so MESA fits its distribution over
transformations of the family that fired, as over patches of a size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.detectors import Evidence, centred, register_detector
from mesa_lib.geometry import Geometry, register_geometry
from mesa_lib.masksearch import _adjust
from mesa_lib.mesa import autocast_for, frozen
from mesa_lib.metrics import anomaly_index

FAMILIES = ("additive", "colour", "warp")


@dataclass(frozen=True)
class TransformSearchConfig:
    """Settings of the search.

    Attributes:
        families: which transformation families are searched.
        steps: optimisation steps per family, every class in each.
        batch_size: images per step and class.
        lr: Adam step size on the unconstrained parameters.
        grid: side of the low-resolution grid of `additive` and `warp`.
        max_shift: largest displacement of `warp`, in pixels.
        max_add: largest change of `additive`, in pixel units ([0, 1]).
        asr_threshold: a transformation succeeds on a batch when this share goes to its class.
        init_cost, cost_step: lambda's start and Neural Cleanse's rule.
        seed: seed of the starts and the batches.
    """

    families: tuple[str, ...] = FAMILIES
    steps: int = field(default=150, metadata={"ge": 1})
    batch_size: int = field(default=8, metadata={"ge": 1})
    lr: float = field(default=0.05, metadata={"gt": 0})
    grid: int = field(default=8, metadata={"ge": 2})
    max_shift: float = field(default=4.0, metadata={"gt": 0})
    max_add: float = field(default=0.5, metadata={"gt": 0})
    asr_threshold: float = field(default=0.9, metadata={"gt": 0, "le": 1})
    init_cost: float = field(default=1.0, metadata={"gt": 0})
    cost_step: float = field(default=1.2, metadata={"gt": 1})
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families: {sorted(unknown) or 'none given'}; known: {FAMILIES}")


@dataclass(frozen=True)
class TransformSearchResult:
    """Per searched class (K,): the smallest successful transformation's size, the family it
    is of, its attack success on all the images; and the sizes per family (F, K)."""

    classes: tuple[int, ...]
    size: Tensor
    family: tuple[str, ...]
    asr: Tensor
    per_family: dict[str, Tensor]
    found: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)

    def transformation(self, i: int, config: TransformSearchConfig) -> Transformed:
        """The i-th searched class's smallest transformation, as a trigger applied with the
        bounds (max_add, max_shift) of `config`, the search's."""
        name = self.family[i]
        return Transformed(name, [p[i:i + 1].detach().cpu() for p in self.found[name]], config)

    def anomaly(self) -> Tensor:
        """(K,) MAD anomaly index of the sizes (a small size is negative)."""
        return anomaly_index(self.size)


# Each family: (make the K unconstrained parameter tensors, apply them to x (B, C, H, W)
# -> (K, B, C, H, W)).
Maker = Callable[[int, tuple[int, int, int], torch.Generator, TransformSearchConfig],
                 list[Tensor]]
Applier = Callable[[list[Tensor], Tensor, TransformSearchConfig], Tensor]


def _up(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, D, g, g) -> (K, D, H, W), bilinear: a smooth field."""
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)


def _make_additive(k: int, shape: tuple[int, int, int], gen: torch.Generator,
                   cfg: TransformSearchConfig) -> list[Tensor]:
    return [torch.randn(k, shape[0], cfg.grid, cfg.grid, generator=gen) * 0.01]


def _apply_additive(params: list[Tensor], x: Tensor, cfg: TransformSearchConfig) -> Tensor:
    delta = cfg.max_add * torch.tanh(_up(params[0], tuple(x.shape[-2:])))  # (K, C, H, W)
    return (x[None] + delta[:, None]).clamp(0, 1)


def _make_colour(k: int, shape: tuple[int, int, int], gen: torch.Generator,
                 cfg: TransformSearchConfig) -> list[Tensor]:
    c = shape[0]
    return [torch.randn(k, c, c, generator=gen) * 0.01, torch.randn(k, c, generator=gen) * 0.01]


def _apply_colour(params: list[Tensor], x: Tensor, cfg: TransformSearchConfig) -> Tensor:
    eye = torch.eye(x.shape[1], device=x.device)
    mix = torch.einsum("kij,bjhw->kbihw", eye + params[0], x)
    return (mix + params[1][:, None, :, None, None]).clamp(0, 1)


def _make_warp(k: int, shape: tuple[int, int, int], gen: torch.Generator,
               cfg: TransformSearchConfig) -> list[Tensor]:
    return [torch.randn(k, 2, cfg.grid, cfg.grid, generator=gen) * 0.01]


def _apply_warp(params: list[Tensor], x: Tensor, cfg: TransformSearchConfig) -> Tensor:
    k, (b, c, h, w) = len(params[0]), x.shape
    # displacement in grid_sample's [-1, 1] units: max_shift pixels = 2 * max_shift / side
    scale = torch.tensor([2 * cfg.max_shift / w, 2 * cfg.max_shift / h], device=x.device)
    flow = torch.tanh(_up(params[0], (h, w))).permute(0, 2, 3, 1) * scale  # (K, H, W, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device),
                            torch.linspace(-1, 1, w, device=x.device), indexing="ij")
    base = torch.stack([xs, ys], -1)                                     # (H, W, 2)
    grid = (base + flow)[:, None].expand(k, b, h, w, 2).reshape(k * b, h, w, 2)
    src = x[None].expand(k, b, c, h, w).reshape(k * b, c, h, w)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(k, b, c, h, w)


_FAMILY: dict[str, tuple[Maker, Applier]] = {
    "additive": (_make_additive, _apply_additive),
    "colour": (_make_colour, _apply_colour),
    "warp": (_make_warp, _apply_warp),
}


def _size(moved: Tensor, x: Tensor) -> Tensor:
    """(K,) RMS change of the images: moved (K, B, C, H, W) against x (B, C, H, W)."""
    return (moved - x[None]).pow(2).flatten(1).mean(1).add(1e-12).sqrt()


def _search_family(model: nn.Module, images: Tensor, classes: tuple[int, ...], name: str,
                   cfg: TransformSearchConfig, device: torch.device
                   ) -> tuple[Tensor, list[Tensor]]:
    """(K,) smallest successful size of family `name` (inf: never succeeded) and its params."""
    make, apply = _FAMILY[name]
    gen = torch.Generator().manual_seed(cfg.seed)
    k, n = len(classes), len(images)
    params = [p.to(device).requires_grad_(True)
              for p in make(k, tuple(images.shape[1:]), gen, cfg)]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9))
    cost = torch.full((k,), cfg.init_cost, device=device)
    y = torch.tensor(classes, device=device).repeat_interleave(cfg.batch_size)
    best = torch.full((k,), float("inf"), device=device)
    kept = [p.detach().clone() for p in params]
    for _ in range(cfg.steps):
        pick = torch.randint(0, n, (cfg.batch_size,), generator=gen).to(device)
        x = images[pick].float().div_(255)
        moved = apply(params, x, cfg)                                    # (K, B, C, H, W)
        with autocast_for(device):
            logits = model(moved.flatten(0, 1)).float()
        ce = F.cross_entropy(logits, y, reduction="none").view(k, -1).mean(1)
        size = _size(moved, x)
        won = (logits.argmax(1) == y).view(k, -1).float().mean(1) >= cfg.asr_threshold
        better = won & (size.detach() < best)
        best = torch.where(better, size.detach(), best)
        for keep, p in zip(kept, params, strict=True):  # the parameters measured, before
            keep[better] = p.detach()[better]            # the step moves them
        opt.zero_grad(set_to_none=True)
        (ce + cost * size).sum().backward()
        opt.step()
        cost = _adjust(cost, won, cfg.cost_step)
    return best, kept


@torch.no_grad()
def _success(model: nn.Module, images: Tensor, apply: Applier, params: list[Tensor],
             classes: tuple[int, ...], cfg: TransformSearchConfig, chunk: int = 64) -> Tensor:
    """(K,) share of all the images each class's transformation sends to it."""
    target = torch.tensor(classes, device=images.device)[:, None]
    hits = torch.zeros(len(classes), device=images.device)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float().div_(255)
        with autocast_for(images.device):
            logits = model(apply(params, x, cfg).flatten(0, 1)).float()
        hits += (logits.argmax(1).view(len(classes), -1) == target).float().sum(1)
    return hits / len(images)


def transform_search(model: nn.Module, images: Tensor, classes: tuple[int, ...],
                     config: TransformSearchConfig, device: torch.device
                     ) -> TransformSearchResult:
    """The smallest successful transformation of every class, over the families.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits; frozen here.
        images: the defender's clean images, uint8 (N, C, H, W).
        classes: the K classes to search.
    """
    images = images.to(device)
    per_family, found = {}, {}
    with frozen(model):
        for name in config.families:
            size, params = _search_family(model, images, classes, name, config, device)
            per_family[name], found[name] = size.cpu(), params
    stacked = torch.stack([per_family[n] for n in config.families])        # (F, K)
    best = stacked.min(0)
    family = tuple(config.families[i] for i in best.indices.tolist())
    asr = torch.zeros(len(classes))
    with frozen(model):
        for name in set(family):
            rows = [i for i, f in enumerate(family) if f == name]
            _, apply = _FAMILY[name]
            asr[rows] = _success(model, images, apply, found[name], classes, config)[rows].cpu()
    # a class nothing reached reports the largest size any family can make (the cap)
    size = torch.where(torch.isinf(best.values), torch.ones_like(best.values), best.values)
    return TransformSearchResult(tuple(classes), size, family, asr, per_family,
                                 {n: [p.cpu() for p in ps] for n, ps in found.items()})


# --------------------------------------------------------------------------- as a trigger

REACH = 4.0  # a repair's transformations: up to this many times the recovered one's size


@dataclass(frozen=True)
class Transformed:
    """One recovered transformation of family `name` (its search parameters, leading dim 1),
    as a trigger a repair unlearns and a verification measures (a `Family`)."""

    name: str
    params: list[Tensor]
    config: TransformSearchConfig = TransformSearchConfig()

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _, apply = _FAMILY[self.name]
        params = [p.to(images.device) for p in self.params]
        return apply(params, images, self.config)[0]


def grid_shape(name: str, channels: int, config: TransformSearchConfig) -> tuple[int, int, int]:
    """(D, a, b) of family `name`'s parameter grid, the `transform` geometry's trigger shape."""
    if name == "colour":
        return (1, channels, channels + 1)
    return (2 if name == "warp" else channels, config.grid, config.grid)


def _per_image(name: str, grids: Tensor, x: Tensor, config: TransformSearchConfig,
               reach: float) -> Tensor:
    """Each image transformed by its own grid: grids (B, D, a, b) in [0, 1], x (B, C, H, W);
    `reach`: the largest change of an additive pattern or of a colour map's entries (a warp
    keeps its max_shift)."""
    g = 2 * grids - 1
    if name == "colour":
        g = reach * g
        c = x.shape[1]
        mix = torch.einsum("bij,bjhw->bihw", torch.eye(c, device=x.device) + g[:, 0, :, :c], x)
        return (mix + g[:, 0, :, c, None, None] / 2).clamp(0, 1)
    if name == "additive":
        return (x + reach * _up(g, tuple(x.shape[-2:]))).clamp(0, 1)
    b, _, h, w = x.shape  # warp: as _apply_warp, one displacement field per image
    scale = torch.tensor([2 * config.max_shift / w, 2 * config.max_shift / h], device=x.device)
    flow = _up(g, (h, w)).permute(0, 2, 3, 1) * scale                    # (B, H, W, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device),
                            torch.linspace(-1, 1, w, device=x.device), indexing="ij")
    return F.grid_sample(x, torch.stack([xs, ys], -1) + flow, mode="bilinear",
                         padding_mode="border", align_corners=True)


@register_geometry("transform")
def _place_transform(images: Tensor, triggers: Tensor, geometry: Geometry,
                     generator: torch.Generator | None) -> Tensor:
    name, config, reach = geometry.extra
    return _per_image(name, triggers.to(images.device), images, config, reach)


def _reduce_transform(evidence: Evidence) -> dict[int, float]:
    return centred(evidence, "transform_size", lambda size: -size.clamp_min(1e-4).log())


def _transform_trigger(model: nn.Module, images: Tensor, labels: Tensor | None, target: int,
                       config: TransformSearchConfig, device: torch.device
                       ) -> tuple[Transformed, Geometry]:
    """The target's smallest transformation, and the geometry of its family's grids."""
    found = transform_search(model, images, (target,), config, device)
    trigger = found.transformation(0, config)
    shape = grid_shape(trigger.name, images.shape[1], config)
    evidence = {"family": trigger.name, "transform_size": round(float(found.size[0]), 4),
                "transform_asr": round(float(found.asr[0]), 4)}
    # MESA's additive and colour changes stay within REACH times the recovered one's RMS size
    # (the largest change an entry may make): a family's whole range (a colour matrix I +- 1)
    # also holds changes that erase what tells the classes apart, and a repair that keeps their
    # labels true then cost 38 points of accuracy on a tiny model of the tests (none within it)
    reach = min(config.max_add, REACH * float(found.size[0]))
    evidence["reach"] = round(reach, 4)
    return trigger, Geometry("transform", shape[1:], None, 0.0, None, evidence,
                             depth=shape[0], extra=(trigger.name, config, reach))


@register_detector("transform", TransformSearchConfig, _reduce_transform, _transform_trigger)
def measure_transform(model: nn.Module, images: Tensor, labels: Tensor | None,
                      classes: tuple[int, ...], config: TransformSearchConfig,
                      device: torch.device) -> tuple[Evidence, dict[int, Tensor]]:
    """The transformation search for `classes`: each one's smallest size (overall and per
    family) and its ASR; samples: the first reference image under each class's
    transformation (1, C, H, W)."""
    found = transform_search(model, images, classes, config, device)
    evidence = {c: {"transform_size": float(found.size[i]), "transform_asr": float(found.asr[i]),
                    **{f"size_{n}": float(found.per_family[n][i]) for n in config.families}}
                for i, c in enumerate(found.classes)}
    first = images[:1].float().div(255)
    samples = {c: found.transformation(i, config).apply(first)
               for i, c in enumerate(found.classes)}
    return evidence, samples
