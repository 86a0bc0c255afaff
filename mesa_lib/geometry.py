"""Where a recovered trigger sits, and how a repair puts its own triggers there.

A repair can only unlearn triggers of the kind the backdoor answers to. The mask search
(mesa_lib.masksearch) recovers, for a flagged class, a full-image mask m (1, H, W) and pattern p;
the mask's support is the trigger's geometry (`geometry_of`):

- `patch`: most of the mask's mass lies in a small box (side <= `max_side`). The box, widened by
  `margin` pixels, is the size of the triggers modelled, so a trigger the search found only part
  of (a 3x3 core of a 5x5 patch) is still covered. Triggers go at the box's place or, with
  probability `spread`, at a uniform random place (as MESA's paper puts its 3x3 triggers). A
  single recovered trigger cannot tell a fixed-place backdoor from one that fires anywhere:
  moving the recovered patch (`fires_anywhere`, recorded as evidence) kept 40% of its ASR for a
  random-place backdoor of the tests and 25% for a fixed-place one, too close for a threshold,
  so both places are always covered (spread 0.5).
- `blend`: the mass is spread over the image (a blended or full-image trigger, or a patch the
  search found as several specks). Triggers are full-image patterns put through the recovered
  mask, x' = (1 - m) x + m t, or, with probability `spread`, the pattern's crop at the mask's
  densest part (`core`: the box of its heaviest connected piece, widened by `margin`) stamped
  at a random place. Why: a patch backdoor answers to its patch at shifted places too, and the
  search then finds it off its real place, split into specks: on the calibration zoo a 4x4
  corner patch came out as a 4x4 speck 4 rows above the corner plus two more (cal-inj-06),
  and a repair through that mask alone left 11-28% of the true trigger's ASR while the
  recovered one fell to 2-7%.

A geometry kind is a name and its placing function (`register_geometry`); a detector whose
triggers are not patterns (a warp, a colour filter) registers its own. `Placed` pairs a sampler
of patterns (MESA's distribution, random patches, one trigger) with a geometry, `Mixture` draws
from several (one per flagged target); both are `Family`s: `apply(images, generator)`, what a
repair and a residual-ASR measurement call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mesa_lib.triggers import random_locations, stamp


class Family(Protocol):
    """Anything a repair stamps: `apply(images, generator)` -> triggered images.

    images: float (B, C, H, W) in [0, 1]; the result has the same shape, images not modified.
    """

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


@dataclass(frozen=True)
class Geometry:
    """Where a repair's triggers go.

    Attributes:
        kind: a registered geometry kind ("patch", "blend", ...).
        size: (h, w) of one trigger.
        location: (row, col) top-left of the recovered place; None = always a random place.
        spread: the share of triggers put at a random place instead (a patch with a
            location; a blend with a `core`: its crop there).
        mask: (1, H, W) in [0, 1], the blend's recovered mask (None for a patch).
        core: a blend's (row, col, h, w) densest box, whose crop a moved trigger stamps.
        depth: channels of one trigger when not the images' (a transformation's grid).
        extra: what a registered kind's placing function needs beyond these.
        evidence: how it was estimated (JSON-able numbers), for the record.
    """

    kind: str
    size: tuple[int, int]
    location: tuple[int, int] | None = None
    spread: float = 0.0
    mask: Tensor | None = field(default=None, compare=False, repr=False)
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)
    core: tuple[int, int, int, int] | None = None
    depth: int | None = None
    extra: Any = field(default=None, compare=False, repr=False)

    def trigger_shape(self, channels: int) -> tuple[int, int, int]:
        """(C, h, w) of one trigger."""
        return (self.depth or channels, *self.size)

    def place(self, images: Tensor, triggers: Tensor, generator: torch.Generator | None = None
              ) -> Tensor:
        """Put triggers (B, C, h, w) on images (B, C, H, W) float in [0, 1]: a new tensor."""
        return placer(self.kind)(images, triggers, self, generator)

    def record(self) -> dict[str, Any]:
        """JSON-able description (the mask left out: its evidence says how it was found)."""
        return {"kind": self.kind, "size": list(self.size),
                "location": None if self.location is None else list(self.location),
                "spread": self.spread,
                **({"core": list(self.core)} if self.core is not None else {}),
                **self.evidence}


Placer = Callable[[Tensor, Tensor, Geometry, "torch.Generator | None"], Tensor]
PLACERS: dict[str, Placer] = {}


def register_geometry(name: str) -> Callable[[Placer], Placer]:
    """Function decorator adding a geometry kind: how its triggers are put on images."""

    def add(place: Placer) -> Placer:
        PLACERS[name] = place
        return place

    return add


def placer(kind: str) -> Placer:
    """The placing function of geometry `kind`; unknown kinds are an error naming the known."""
    if kind not in PLACERS:
        raise ValueError(f"unknown trigger geometry {kind!r}; known: {sorted(PLACERS)}")
    return PLACERS[kind]


def covering_locations(n: int, image_hw: tuple[int, int], trigger_hw: tuple[int, int],
                       generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """Top-left corners under which every pixel is about equally likely to be covered: int64
    (n, 2) as (row, col). Drawn uniformly among the places where the trigger overlaps the image
    at all, then moved inside it. Why not uniform top-left corners: they cover a corner pixel h x w
    times less often than a central one, so a repair stamping the recovered patch "anywhere" that
    way barely touches a corner trigger (test-inj-11 of the zoo: a 5x5 corner patch recovered 14
    columns off its place kept 15.8% ASR after the repair)."""
    (H, W), (h, w) = image_hw, trigger_hw
    if h > H or w > W:
        raise ValueError(f"trigger {h}x{w} does not fit in image {H}x{W}")
    rows = torch.randint(1 - h, H, (n,), generator=generator).clamp(0, H - h)
    cols = torch.randint(1 - w, W, (n,), generator=generator).clamp(0, W - w)
    return torch.stack([rows, cols], dim=1).to(device)


def probe_places(image_hw: tuple[int, int], trigger_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The places a verification puts a recovered patch besides its own: the four corners, the
    middle of each edge and the centre, (row, col) top-left corners inside the image."""
    (H, W), (h, w) = image_hw, trigger_hw
    rows, cols = (0, (H - h) // 2, H - h), (0, (W - w) // 2, W - w)
    return [(r, c) for r in rows for c in cols]


@register_geometry("patch")
def _place_patch(images: Tensor, triggers: Tensor, geometry: Geometry,
                 generator: torch.Generator | None) -> Tensor:
    if geometry.location is None:
        loc = random_locations(len(images), tuple(images.shape[-2:]),
                               tuple(triggers.shape[-2:]), generator, images.device)
    elif geometry.spread > 0:
        free = covering_locations(len(images), tuple(images.shape[-2:]),
                                  tuple(triggers.shape[-2:]), generator)
        moved = torch.rand(len(images), generator=generator) < geometry.spread
        loc = torch.where(moved[:, None], free, torch.tensor(geometry.location)).to(images.device)
    else:
        loc = torch.tensor(geometry.location, device=images.device)
    return stamp(images, triggers, loc)


@register_geometry("blend")
def _place_blend(images: Tensor, triggers: Tensor, geometry: Geometry,
                 generator: torch.Generator | None) -> Tensor:
    m = geometry.mask.to(images.device)
    out = (1 - m) * images + m * triggers.to(images.device)
    if geometry.core is None or geometry.spread <= 0:
        return out
    r, c, h, w = geometry.core
    crops = triggers[:, :, r:r + h, c:c + w].to(images.device)
    loc = covering_locations(len(images), tuple(images.shape[-2:]), (h, w), generator)
    moved = (torch.rand(len(images), generator=generator) < geometry.spread).to(images.device)
    stamped = stamp(images, crops.expand(len(images), *crops.shape[1:]), loc.to(images.device))
    return torch.where(moved[:, None, None, None], stamped, out)


def anywhere(size: tuple[int, int]) -> Geometry:
    """A patch of `size` at random places (the paper's geometry for its 3x3 triggers)."""
    return Geometry("patch", (int(size[0]), int(size[1])))


@dataclass(frozen=True)
class Placed:
    """A sampler of patterns put on images through a geometry (a `Family`).

    Args:
        sampler: `sample(n, generator) -> (n, C, h, w)` in [0, 1] (MESA's distribution, random
            patches, one constant trigger).
        geometry: where they go; None = anywhere, at the sampler's own trigger size.
        noise: std of Gaussian noise added to each sampled trigger (then clamped).
    """

    sampler: Any
    geometry: Geometry | None = None
    noise: float = 0.0

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        trig = self.sampler.sample(len(images), generator).to(images.device, images.dtype)
        if self.noise > 0:
            eps = torch.randn(trig.shape, generator=generator).to(trig.device, trig.dtype)
            trig = (trig + self.noise * eps).clamp(0, 1)
        geometry = self.geometry or anywhere(tuple(trig.shape[-2:]))
        return geometry.place(images, trig, generator)


@dataclass(frozen=True)
class CropAt:
    """A recovered mask + pattern's crop blended in at one place (a `Family`; nothing drawn).

    Attributes:
        mask: (1, h, w) in [0, 1]; pattern: (C, h, w) in [0, 1]; place: (row, col) top-left.
    """

    mask: Tensor
    pattern: Tensor
    place: tuple[int, int]

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        loc = torch.tensor(self.place, device=images.device)
        m = stamp(torch.zeros(len(images), *self.mask.shape[:1], *images.shape[-2:],
                              device=images.device), self.mask.to(images.device), loc)
        p = stamp(torch.zeros_like(images), self.pattern.to(images.device), loc)
        return (1 - m) * images + m * p


def probes(mask: Tensor, pattern: Tensor, geometry: Geometry) -> list[CropAt]:
    """The recovered trigger's crop (a patch's box, a blend's core) at each of `probe_places`:
    a backdoor that answers to its patch at shifted places may still answer at the image's edge
    after a repair that removed it at the place the search recovered. None for other kinds.

    Args:
        mask: (1, H, W) and pattern (C, H, W) as recovered over the whole image.
    """
    if geometry.kind == "patch" and geometry.location is not None:
        (r, c), (h, w) = geometry.location, geometry.size
    elif geometry.kind == "blend" and geometry.core is not None:
        r, c, h, w = geometry.core
    else:
        return []
    crop_m, crop_p = mask[:, r:r + h, c:c + w], pattern[:, r:r + h, c:c + w]
    return [CropAt(crop_m, crop_p, place)
            for place in probe_places(tuple(mask.shape[-2:]), (h, w))]


@dataclass(frozen=True)
class Mixture:
    """Several families, each image drawing one uniformly (one family per flagged target)."""

    families: Sequence[Family]

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if len(self.families) == 1:
            return self.families[0].apply(images, generator)
        pick = torch.randint(0, len(self.families), (len(images),), generator=generator)
        out = images.clone()
        for i, family in enumerate(self.families):
            idx = (pick == i).nonzero().squeeze(1).to(images.device)
            if len(idx):
                out[idx] = family.apply(images[idx], generator)
        return out


@dataclass(frozen=True)
class Recovered:
    """What a detector recovered for one flagged target: the trigger as found (its ASR is what
    a verification measures) and the geometry a repair models its triggers in."""

    target: int
    detector: str
    trigger: Family
    geometry: Geometry


def _around(pixels: Tensor, m: Tensor, margin: int) -> tuple[int, int, int, int, float]:
    """(row0, col0, h, w, share of m's mass inside) of the box around the True `pixels`
    (H, W) of a mask m (H, W), widened by `margin` and kept inside the image."""
    rows, cols = pixels.any(1).nonzero().squeeze(1), pixels.any(0).nonzero().squeeze(1)
    (height, width) = m.shape
    r0, r1 = max(int(rows.min()) - margin, 0), min(int(rows.max()) + margin, height - 1)
    c0, c1 = max(int(cols.min()) - margin, 0), min(int(cols.max()) + margin, width - 1)
    inside = float(m[r0:r1 + 1, c0:c1 + 1].sum() / m.sum().clamp_min(1e-12))
    return r0, c0, r1 - r0 + 1, c1 - c0 + 1, inside


def _box(mask: Tensor, margin: int) -> tuple[int, int, int, int, float]:
    """(row0, col0, h, w, share of the mask's mass inside) of the box around the mask's core
    (pixels >= half its peak), widened by `margin` and kept inside the image."""
    m = mask[0]
    return _around(m >= 0.5 * m.max(), m, margin)


def densest_box(mask: Tensor, margin: int) -> tuple[tuple[int, int, int, int], float]:
    """((row, col, h, w), share of the mask's mass inside) of the box around the heaviest
    connected piece of the mask's core (pixels >= half its peak; specks 1 pixel apart count as
    connected), widened by `margin` and kept inside the image. mask: (1, H, W)."""
    m = mask[0].float()
    core = m >= 0.5 * m.max()
    joined = torch.nn.functional.max_pool2d(core[None, None].float(), 3, 1, 1)[0, 0] > 0
    height, width = m.shape
    label = torch.arange(1, height * width + 1, dtype=m.dtype).view(height, width) * joined
    while True:  # every joined pixel takes the largest label of its piece
        grown = torch.nn.functional.max_pool2d(label[None, None], 3, 1, 1)[0, 0] * joined
        if torch.equal(grown, label):
            break
        label = grown
    pieces = label[core].unique()
    mass = torch.stack([m[core & (label == k)].sum() for k in pieces])
    r, c, h, w, inside = _around(core & (label == pieces[int(mass.argmax())]), m, margin)
    return (r, c, h, w), inside


@torch.no_grad()
def _hits(model: nn.Module, images: Tensor, target: int) -> float:
    """Share of float images (N, C, H, W) the model sends to `target`."""
    return float((model(images).argmax(1) == target).float().mean())


@torch.no_grad()
def fires_anywhere(model: nn.Module, images: Tensor, mask: Tensor, pattern: Tensor,
                   box: tuple[int, int, int, int], target: int, generator: torch.Generator
                   ) -> tuple[float, float]:
    """ASR of the recovered patch at its own place and at random places.

    Args:
        images: float (N, C, H, W) in [0, 1] of classes other than `target`, on the model's
            device; mask (1, H, W), pattern (C, H, W); box (row, col, h, w) of the patch.

    Returns:
        (ASR at its place, ASR at a random place per image).
    """
    r, c, h, w = box
    device = images.device
    mask, pattern = mask.to(device), pattern.to(device)
    here = _hits(model, (1 - mask) * images + mask * pattern, target)
    loc = random_locations(len(images), tuple(images.shape[-2:]), (h, w), generator, device)
    zeros_m = torch.zeros(len(images), *mask.shape, device=device)
    zeros_p = torch.zeros(len(images), *pattern.shape, device=device)
    moved_m = stamp(zeros_m, mask[:, r:r + h, c:c + w], loc)
    moved_p = stamp(zeros_p, pattern[:, r:r + h, c:c + w], loc)
    moved = _hits(model, (1 - moved_m) * images + moved_m * moved_p, target)
    return here, moved


@dataclass(frozen=True)
class GeometryConfig:
    """How a recovered mask becomes a geometry.

    Attributes:
        max_side: a core box with both sides at most this is a patch, else a blend.
        min_inside: ... and it holds at least this share of the mask's mass.
        margin: pixels added around the core box on every side.
        spread: share of a patch's triggers put at random places rather than at its own,
            and of a blend's triggers stamped as their densest crop at a random place.
    """

    max_side: int = 12
    min_inside: float = 0.5
    margin: int = 1
    spread: float = 0.5


def geometry_of(model: nn.Module, images: Tensor, mask: Tensor, pattern: Tensor, target: int,
                config: GeometryConfig, generator: torch.Generator) -> Geometry:
    """The geometry of a recovered mask + pattern (module docstring).

    Args:
        model: the (backdoored) classifier, frozen by the caller, on images' device.
        images: float (N, C, H, W) in [0, 1] of classes other than `target`.
        mask: (1, H, W) in [0, 1]; pattern: (C, H, W) in [0, 1].
    """
    r, c, h, w, inside = _box(mask, 0)
    evidence = {"core_rows": h, "core_cols": w, "mass_inside": round(inside, 4)}
    if max(h, w) > config.max_side or inside < config.min_inside:
        core, share = densest_box(mask, config.margin)
        evidence |= {"core_share": round(share, 4)}
        return Geometry("blend", tuple(mask.shape[-2:]), (0, 0), config.spread,
                        mask.detach().cpu(), evidence, core)
    r, c, h, w, _ = _box(mask, config.margin)
    here, moved = fires_anywhere(model, images, mask, pattern, (r, c, h, w), target, generator)
    evidence |= {"asr_at_place": round(here, 4), "asr_moved": round(moved, 4)}
    return Geometry("patch", (h, w), (r, c), config.spread, None, evidence)
