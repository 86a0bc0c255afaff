"""Baselines MESA is compared with: the single-point trigger and Neural Cleanse.

- Point baseline (Qiao, Yang, Li, NeurIPS 2019, Sec. 5.2): one trigger optimised in pixel space
  by SGD (lr 0.1, momentum 0.9) on the cross-entropy to the target, stamped at random places,
  projected back to [0, 1] after each step; K random starts (10 in the paper). The K results form
  a `PointDistribution`, so repair treats them exactly like a MESA distribution. The K starts are
  optimised together, one classifier forward over the K stamped batches.
- Neural Cleanse (Wang et al., S&P 2019, Sec. IV): for every class k, a full-image mask m_k and
  pattern p_k with x' = (1 - m_k) x + m_k p_k, minimising CE(x', k) + lambda_k |m_k|_1 with
  NC's adaptive lambda; a class whose L1 norm is an outlier on the small side (MAD anomaly index
  below -2) is flagged. All classes are optimised together in one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.distribution import PointDistribution
from mesa_lib.mesa import frozen
from mesa_lib.metrics import anomaly_index
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


def _index_batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=gen)
    yield from (order[s : s + size] for s in range(0, n, size))


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
            for idx in _index_batches(len(images), config.batch_size, gen):
                x = images[idx.to(device)].float().div_(255)
                b = len(x)
                loc = random_locations(k * b, hw, thw, gen, device)
                stamped = stamp(x.repeat(k, 1, 1, 1), trig.repeat_interleave(b, 0), loc)
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


@dataclass(frozen=True)
class CleanseConfig:
    """Neural Cleanse settings (the NC authors' defaults where they exist)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    adam_betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    asr_threshold: float = 0.99
    anomaly_threshold: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class CleanseResult:
    """Neural Cleanse output for K classes.

    Attributes:
        masks: (K, 1, H, W) in [0, 1]; patterns: (K, C, H, W) in [0, 1].
        l1: (K,) L1 norm of each mask; asr: (K,) last-epoch attack success of each class.
        anomaly: (K,) signed MAD anomaly index of the L1 norms (small norm = negative).
        flagged: classes with anomaly < -anomaly_threshold, most anomalous first.
    """

    masks: Tensor
    patterns: Tensor
    l1: Tensor
    asr: Tensor
    anomaly: Tensor
    flagged: tuple[int, ...]


def neural_cleanse(
    model: nn.Module, images: Tensor, num_classes: int, config: CleanseConfig,
    device: torch.device,
) -> CleanseResult:
    """Reverse-engineer a minimal full-image mask + pattern for every class, then MAD-test.

    Args:
        model: frozen classifier, float (B, C, H, W) in [0, 1] -> logits (B, num_classes).
        images: defender's images, uint8 (N, C, H, W).
    """
    gen = torch.Generator().manual_seed(config.seed)
    _, c, h, w = images.shape
    k = num_classes
    mask_p = (torch.randn(k, 1, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    pat_p = (torch.randn(k, c, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pat_p], lr=config.lr, betas=config.adam_betas)
    cost = torch.full((k,), config.init_cost, device=device)
    labels = torch.arange(k, device=device)
    images = images.to(device)
    with frozen(model):
        for _ in range(config.epochs):
            hits, seen = torch.zeros(k, device=device), 0
            for idx in _index_batches(len(images), config.batch_size, gen):
                x = images[idx.to(device)].float().div_(255)
                b = len(x)
                mask, pat = torch.tanh(mask_p) / 2 + 0.5, torch.tanh(pat_p) / 2 + 0.5
                mixed = (1 - mask[:, None]) * x[None] + mask[:, None] * pat[:, None]
                logits = model(mixed.flatten(0, 1)).float()  # (K*B, classes)
                y = labels.repeat_interleave(b)
                ce = F.cross_entropy(logits, y, reduction="none").view(k, b).mean(1)
                loss = (ce + cost * mask.flatten(1).sum(1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += (logits.argmax(1) == y).view(k, b).float().sum(1).detach()
                seen += b
            asr = hits / seen
            # NC's schedule: raise the cost while the attack succeeds, lower it otherwise.
            up = asr >= config.asr_threshold
            cost = torch.where(up, cost * config.cost_multiplier,
                               cost / config.cost_multiplier**1.5)
    mask, pat = (torch.tanh(mask_p) / 2 + 0.5).detach(), (torch.tanh(pat_p) / 2 + 0.5).detach()
    l1 = mask.flatten(1).sum(1).cpu()
    anomaly = anomaly_index(l1)
    order = torch.argsort(anomaly).tolist()
    flagged = tuple(i for i in order if anomaly[i] < -config.anomaly_threshold)
    return CleanseResult(mask.cpu(), pat.cpu(), l1, asr.cpu(), anomaly, flagged)
