"""The single-point baseline MESA is compared with (Neural Cleanse, the other baseline, is
mesa_lib.masksearch.neural_cleanse: one implementation of its objective for both its uses).

- Point baseline (Qiao, Yang, Li, NeurIPS 2019, Sec. 5.2): one trigger optimised in pixel space
  by SGD (lr 0.1, momentum 0.9) on the cross-entropy to the target, stamped at random places,
  projected back to [0, 1] after each step; K random starts (10 in the paper). The K results form
  a `PointDistribution`, so repair treats them exactly like a MESA distribution. The K starts are
  optimised together, one classifier forward over the K stamped batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.distribution import PointDistribution
from mesa_lib.mesa import autocast_for, frozen
from mesa_lib.train import index_batches
from mesa_lib.triggers import random_locations, stamp


@dataclass(frozen=True)
class PointConfig:
    """Single-point baseline settings (paper's values)."""

    starts: int = 10
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0


def fit_point(
    model: nn.Module,
    images: Tensor,
    target: int,
    trigger_shape: tuple[int, int, int],
    config: PointConfig,
    device: torch.device,
) -> PointDistribution:
    """Optimise `config.starts` triggers (C, h, w) in [0, 1] toward `target`, together.

    Args:
        model: frozen classifier, float (B, C, H, W) in [0, 1] -> logits (B, K).
        images: defender's images, uint8 (N, C, H, W).

    Returns:
        `PointDistribution` of the K optimised triggers (K, C, h, w), on `device`.
    """
    gen = torch.Generator().manual_seed(config.seed)
    k = config.starts
    trig = torch.rand(k, *trigger_shape, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.SGD([trig], lr=config.lr, momentum=config.momentum)
    images = images.to(device)
    hw, thw = tuple(images.shape[-2:]), tuple(trigger_shape[-2:])
    with frozen(model):
        for _ in range(config.epochs):
            for idx in index_batches(len(images), config.batch_size, gen):
                x = images[idx.to(device)].float().div_(255)
                b = len(x)
                loc = random_locations(k * b, hw, thw, gen, device)
                stamped = stamp(x.repeat(k, 1, 1, 1), trig.repeat_interleave(b, 0), loc)
                with autocast_for(device):  # the same precision as MESA's fit
                    logits = model(stamped).float()
                y = torch.full((k * b,), target, device=device)
                # Sum over starts of each start's mean loss: K independent optimisations.
                loss = F.cross_entropy(logits, y, reduction="sum") / b
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    trig.clamp_(0, 1)
    return PointDistribution(trig.detach(), target)
