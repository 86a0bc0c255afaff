"""Triggers and the one `stamp` that poisoning, evaluation, MESA and repair all use.

The MESA paper (Qiao et al., NeurIPS 2019, Sec. 5) attacks CIFAR-10 with every black/white 3x3
pattern, up to rotation, flip and colour inversion: 512 masks reduce to 51 classes. A trigger here
is a float tensor (C, h, w) in [0, 1], stamped in pixel space on images (N, C, H, W) in [0, 1]
(or uint8 in [0, 255]), at one top-left location per image.

Triggers are built by name from a registry (`build_trigger("pattern:6")`, like the attacks of
`mesa_lib.poison`): adding a kind is one function with `@register_trigger`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEMO_PATTERN = ((0, 1, 0), (1, 0, 1), (0, 1, 0))


def _symmetries(mask: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/flips of a square mask and the colour-inverted 8."""
    views = []
    for flipped in (mask, np.fliplr(mask)):
        views += [np.rot90(flipped, k) for k in range(4)]
    return views + [1 - v for v in views]


def canonical_patterns(size: int = 3) -> Tensor:
    """All binary `size` x `size` patterns up to rotation, flip and colour inversion.

    Each class is represented by its lexicographically smallest member; classes are sorted.

    Returns:
        float32 tensor (K, size, size) with values in {0, 1}; K = 51 for size 3.
    """
    if not 1 <= size <= 4:
        raise ValueError(f"pattern size must be 1..4 (2**(size*size) masks), got {size}")
    seen: set[bytes] = set()
    reps = []
    for bits in itertools.product((0, 1), repeat=size * size):
        mask = np.array(bits, dtype=np.uint8).reshape(size, size)
        key = min(v.tobytes() for v in _symmetries(mask))
        if key not in seen:
            seen.add(key)
            reps.append(np.frombuffer(key, dtype=np.uint8).reshape(size, size))
    reps.sort(key=lambda r: r.tobytes())
    return torch.from_numpy(np.stack(reps)).float()


def pattern_trigger(pattern: Tensor | tuple | list, channels: int = 3) -> Tensor:
    """A black/white pattern (h, w) in {0, 1} repeated over `channels`: (channels, h, w) float."""
    p = torch.as_tensor(pattern, dtype=torch.float32)
    if p.ndim != 2:
        raise ValueError(f"a pattern must be 2-D (h, w), got shape {tuple(p.shape)}")
    return p.unsqueeze(0).repeat(channels, 1, 1)


def random_color_trigger(
    size: int | tuple[int, int] = 3, channels: int = 3, generator: torch.Generator | None = None
) -> Tensor:
    """A trigger whose every pixel has a random colour: (channels, h, w) float in [0, 1]."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(channels, h, w, generator=generator)


def load_patch(path: Path) -> Tensor:
    """Load a user trigger from a PNG/JPEG image or a `.npy` array (never a pickle).

    Returns:
        float32 (C, h, w) in [0, 1]. A `.npy` may be (h, w), (h, w, C) or (C, h, w); uint8 arrays
        are scaled by 1/255, float arrays must already lie in [0, 1].
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trigger file not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: not a plain .npy array ({err})") from err
        t = torch.from_numpy(np.asarray(arr))
        if t.ndim == 2:
            t = t.unsqueeze(0)
        elif t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
    else:
        try:
            t = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise ValueError(f"{path}: cannot decode image ({err})") from err
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    if t.ndim != 3 or t.min() < 0 or t.max() > 1:
        raise ValueError(f"{path}: trigger must be (C, h, w) with values in [0, 1]")
    return t.contiguous()


TriggerMaker = Callable[[str, int, int, torch.Generator], Tensor]
"""(argument after ':', side, channels, generator) -> trigger (channels, side, side) in [0, 1]."""

TRIGGERS: dict[str, TriggerMaker] = {}


def register_trigger(name: str) -> Callable[[TriggerMaker], TriggerMaker]:
    """Function decorator adding a trigger kind to `TRIGGERS` under `name`."""

    def add(maker: TriggerMaker) -> TriggerMaker:
        TRIGGERS[name] = maker
        return maker

    return add


def build_trigger(spec: str, size: int = 3, channels: int = 3, seed: int = 0) -> Tensor:
    """Build a registered trigger from `name[:argument]`, e.g. "demo", "pattern:6".

    Args:
        spec: the kind and its argument.
        size: side of kinds whose size is free (random ones); fixed patterns ignore it.
        channels: C of the result.
        seed: seed of the generator random kinds draw from.

    Returns:
        float (channels, h, w) in [0, 1].

    Raises:
        ValueError: an unknown kind (the message lists the known ones) or a bad argument.
    """
    name, _, arg = spec.partition(":")
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {spec!r}; known kinds: {sorted(TRIGGERS)}")
    return TRIGGERS[name](arg, size, channels, torch.Generator().manual_seed(seed))


@register_trigger("demo")
def _demo(arg: str, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """The paper's demo pattern [[0,1,0],[1,0,1],[0,1,0]] (3x3)."""
    return pattern_trigger(DEMO_PATTERN, channels)


@register_trigger("pattern")
def _canonical(arg: str, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """`pattern:K`: canonical 3x3 black/white pattern K of the 51."""
    patterns = canonical_patterns(3)
    if not arg.isdigit() or not 0 <= int(arg) < len(patterns):
        raise ValueError(f"pattern:K needs K in 0..{len(patterns) - 1}, got {arg!r}")
    return pattern_trigger(patterns[int(arg)], channels)


@register_trigger("random_color")
def _random_color(arg: str, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """A `size` x `size` patch of random colours."""
    return random_color_trigger(size, channels, generator)


@register_trigger("bw")
def _black_white(arg: str, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """A random black/white `size` x `size` pattern (both colours present), the same on every
    channel."""
    while True:
        mask = (torch.rand(size, size, generator=generator) < 0.5).float()
        if size == 1 or 0 < mask.sum() < size * size:
            return mask.unsqueeze(0).repeat(channels, 1, 1)


def random_locations(
    n: int,
    image_hw: tuple[int, int],
    trigger_hw: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Uniform top-left corners that keep a trigger inside the image: int64 (n, 2) as (row, col)."""
    (H, W), (h, w) = image_hw, trigger_hw
    if h > H or w > W:
        raise ValueError(f"trigger {h}x{w} does not fit in image {H}x{W}")
    rows = torch.randint(0, H - h + 1, (n,), generator=generator)
    cols = torch.randint(0, W - w + 1, (n,), generator=generator)
    return torch.stack([rows, cols], dim=1).to(device)


def corner_location(image_hw: tuple[int, int], trigger_hw: tuple[int, int]) -> Tensor:
    """The bottom-right corner, BadNets' classic fixed place: int64 (2,)."""
    return torch.tensor([image_hw[0] - trigger_hw[0], image_hw[1] - trigger_hw[1]])


def stamp(images: Tensor, trigger: Tensor, locations: Tensor, alpha: float = 1.0) -> Tensor:
    """Paste a trigger onto each image at its location; differentiable in the trigger.

    Args:
        images: (N, C, H, W), float in [0, 1] or uint8 in [0, 255]. Not modified.
        trigger: (C, h, w) shared by all images, or (N, C, h, w) one per image; float in [0, 1].
        locations: int64 (2,) for all images or (N, 2), top-left (row, col) of the trigger.
        alpha: 1 overwrites the pixels (BadNets, MESA); below 1 blends `alpha*trigger +
            (1-alpha)*image` over the patch.

    Returns:
        A new tensor like `images` with the patches replaced.
    """
    n, c, H, W = images.shape
    trig = trigger.expand(n, -1, -1, -1) if trigger.ndim == 3 else trigger
    if trig.shape[:2] != (n, c):
        raise ValueError(f"trigger shape {tuple(trigger.shape)} does not match images {(n, c)}")
    h, w = trig.shape[-2:]
    loc = locations.to(images.device).long().expand(n, 2)
    if (loc < 0).any() or (loc[:, 0] > H - h).any() or (loc[:, 1] > W - w).any():
        raise ValueError(f"a location puts the {h}x{w} trigger outside the {H}x{W} image")
    rows = (loc[:, :1] + torch.arange(h, device=images.device))[:, :, None]  # (N, h, 1)
    cols = (loc[:, 1:] + torch.arange(w, device=images.device))[:, None, :]  # (N, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    patch = trig.to(images.device).permute(0, 2, 3, 1)  # (N, h, w, C) as advanced indexing wants
    if images.dtype == torch.uint8:
        patch = patch * 255
    if alpha != 1.0:
        patch = alpha * patch + (1 - alpha) * images[batch, :, rows, cols].to(patch.dtype)
    if images.dtype == torch.uint8:
        patch = patch.round().clamp(0, 255).to(torch.uint8)
    out = images.clone()
    out[batch, :, rows, cols] = patch.to(out.dtype)
    return out
