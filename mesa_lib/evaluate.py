"""Clean accuracy and attack success rate (ASR).

ASR follows the MESA paper (Qiao et al., NeurIPS 2019, Sec. 5): the share of images whose true
class is NOT the target that the model classifies as the target once the trigger is stamped.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from mesa_lib.triggers import random_locations, stamp


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    device: torch.device,
    batch_size: int = 1000,
    trigger: Tensor | None = None,
    locations: Tensor | None = None,
) -> Tensor:
    """Predicted classes of uint8 images (N, C, H, W), optionally stamped first.

    Args:
        trigger: float (C, h, w) in [0, 1], stamped at `locations` ((2,) or (N, 2)) if given.

    Returns:
        int64 (N,) on the CPU.
    """
    model.eval()
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    preds = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255)
        if trigger is not None:
            loc = locations if locations.ndim == 1 else locations[start : start + batch_size]
            x = stamp(x, trigger.to(device), loc)
        with autocast:
            preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, device: torch.device) -> float:
    """Share of uint8 images (N, C, H, W) classified as their int64 label (N,)."""
    return float((predict(model, images, device) == labels.cpu()).float().mean())


def attack_success_rate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    trigger: Tensor,
    target: int,
    device: torch.device,
    locations: Tensor | str = "random",
    seed: int = 0,
) -> float:
    """ASR over the non-target images.

    Args:
        images: uint8 (N, C, H, W); labels: int64 (N,).
        trigger: float (C, h, w) in [0, 1].
        locations: "random" (one seeded place per image), or an int64 (2,) / (N, 2) tensor.
    """
    keep = labels.cpu() != target
    x = images[keep]
    if isinstance(locations, str):
        if locations != "random":
            raise ValueError(f"locations must be 'random' or a tensor, got {locations!r}")
        gen = torch.Generator().manual_seed(seed)
        locations = random_locations(len(x), tuple(x.shape[-2:]), tuple(trigger.shape[-2:]), gen)
    elif locations.ndim == 2:
        locations = locations[keep]
    if len(x) == 0:
        return 0.0
    return float(
        (predict(model, x, device, trigger=trigger, locations=locations) == target).float().mean()
    )
