"""Baselines MESA is compared with: the single-point trigger and Neural Cleanse.

- Point baseline (Qiao, Yang, Li, NeurIPS 2019, Sec. 5.2): one trigger optimised in pixel space
  by SGD (lr 0.1, momentum 0.9) on the cross-entropy to the target, stamped at random places,
  projected back to [0, 1] after each step; K random starts (10 in the paper). The K results form
  a `PointDistribution`, so repair treats them exactly like a MESA distribution. The K starts are
  optimised together, one classifier forward over the K stamped batches.
- Neural Cleanse (Wang et al., S&P 2019, Sec. IV): for every class k, a full-image mask m_k and
  pattern p_k with x' = (1 - m_k) x + m_k p_k, minimising CE(x', k) + lambda_k |m_k|_1 with
  NC's adaptive lambda; per class the successful mask (ASR >= 0.99) with the smallest L1 norm is
  kept, with patience and early stop; a class whose kept norm is an outlier on the small side
  (MAD anomaly index below -2) is flagged. All classes are optimised together in one forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_lib.distribution import MaskTrigger, PointDistribution
from mesa_lib.mesa import autocast_for, frozen
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


@dataclass(frozen=True)
class CleanseConfig:
    """Neural Cleanse settings (the NC authors' defaults where they exist).

    Attributes:
        epochs: at most this many passes over the images.
        patience: stop a class after this many epochs without a smaller successful mask (and
            the whole search when every class has stopped); 0 = never stop early.
        asr_threshold: a mask counts as successful when it sends this share of images to its
            class; NC keeps the successful mask with the smallest L1 norm.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    adam_betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    asr_threshold: float = 0.99
    patience: int = 5
    anomaly_threshold: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class CleanseResult:
    """Neural Cleanse output for K classes.

    Attributes:
        classes: (K,) the class of each row.
        masks: (K, 1, H, W) in [0, 1]; patterns: (K, C, H, W) in [0, 1]: per class the
            successful mask with the smallest L1 norm (the last iterate if none succeeded).
        l1: (K,) L1 norm of each kept mask; asr: (K,) its attack success in its epoch.
        anomaly: (K,) signed MAD anomaly index of the L1 norms (small norm = negative).
        flagged: classes with anomaly < -anomaly_threshold, most anomalous first.
        epochs: epochs run before every class stopped.
        history: (epochs, 2, K) per epoch the L1 norm and the ASR of each class's mask.
    """

    classes: tuple[int, ...]
    masks: Tensor
    patterns: Tensor
    l1: Tensor
    asr: Tensor
    anomaly: Tensor
    flagged: tuple[int, ...]
    epochs: int
    history: Tensor

    def trigger(self, cls: int) -> MaskTrigger:
        """The kept mask + pattern of class `cls` as a trigger repair can apply."""
        i = self.classes.index(cls)
        return MaskTrigger(self.masks[i], self.patterns[i])


def _decode(mask_p: Tensor, pat_p: Tensor) -> tuple[Tensor, Tensor]:
    """NC's tanh parametrisation: unconstrained -> [0, 1]."""
    return torch.tanh(mask_p) / 2 + 0.5, torch.tanh(pat_p) / 2 + 0.5


def neural_cleanse(
    model: nn.Module, images: Tensor, num_classes: int, config: CleanseConfig,
    device: torch.device, classes: tuple[int, ...] | None = None,
) -> CleanseResult:
    """Reverse-engineer a minimal full-image mask + pattern per class, then MAD-test the norms.

    All classes are optimised together (one forward over the K mixed batches). After each epoch a
    class's mask is kept if it succeeded (ASR >= asr_threshold) with a smaller L1 norm than the
    kept one; a class stops after `patience` epochs without a better mask.

    Args:
        model: frozen classifier, float (B, C, H, W) in [0, 1] -> logits (B, num_classes).
        images: defender's images, uint8 (N, C, H, W).
        classes: the classes to reverse-engineer (default: all); the anomaly index needs several.
    """
    gen = torch.Generator().manual_seed(config.seed)
    _, c, h, w = images.shape
    chosen = tuple(range(num_classes)) if classes is None else tuple(classes)
    k = len(chosen)
    mask_p = (torch.randn(k, 1, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    pat_p = (torch.randn(k, c, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pat_p], lr=config.lr, betas=config.adam_betas)
    cost = torch.full((k,), config.init_cost, device=device)
    labels = torch.tensor(chosen, device=device)
    images = images.to(device)
    best_l1 = torch.full((k,), float("inf"))
    best_asr = torch.zeros(k)
    best_mask, best_pat = (v.detach().cpu() for v in _decode(mask_p, pat_p))
    stale, ran, history = torch.zeros(k, dtype=torch.long), 0, []
    with frozen(model):
        for ran in range(1, config.epochs + 1):  # noqa: B007 - `ran` is reported
            hits, seen = torch.zeros(k, device=device), 0
            for idx in _index_batches(len(images), config.batch_size, gen):
                x = images[idx.to(device)].float().div_(255)
                b = len(x)
                mask, pat = _decode(mask_p, pat_p)
                mixed = (1 - mask[:, None]) * x[None] + mask[:, None] * pat[:, None]
                with autocast_for(device):
                    logits = model(mixed.flatten(0, 1)).float()  # (K*B, classes)
                y = labels.repeat_interleave(b)
                ce = F.cross_entropy(logits, y, reduction="none").view(k, b).mean(1)
                loss = (ce + cost * mask.flatten(1).sum(1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += (logits.argmax(1) == y).view(k, b).float().sum(1).detach()
                seen += b
            asr = (hits / seen).cpu()
            mask, pat = (v.detach().cpu() for v in _decode(mask_p, pat_p))
            l1 = mask.flatten(1).sum(1)
            history.append(torch.stack([l1, asr]))
            better = (asr >= config.asr_threshold) & (l1 < best_l1)
            best_l1, best_asr = torch.where(better, l1, best_l1), torch.where(better, asr, best_asr)
            best_mask[better], best_pat[better] = mask[better], pat[better]
            stale = torch.where(better, 0, stale + 1)
            # NC's schedule: raise the cost while the attack succeeds, lower it otherwise.
            up = (asr >= config.asr_threshold).to(device)
            cost = torch.where(up, cost * config.cost_multiplier,
                               cost / config.cost_multiplier**1.5)
            if config.patience and bool((stale >= config.patience).all()):
                break
    never = torch.isinf(best_l1)  # no successful mask: keep the last iterate, as NC reports it
    best_mask[never], best_pat[never] = mask[never], pat[never]
    best_l1 = torch.where(never, mask.flatten(1).sum(1), best_l1)
    best_asr = torch.where(never, asr, best_asr)
    anomaly = anomaly_index(best_l1)
    order = torch.argsort(anomaly).tolist()
    flagged = tuple(chosen[i] for i in order if anomaly[i] < -config.anomaly_threshold)
    return CleanseResult(chosen, best_mask, best_pat, best_l1, best_asr, anomaly, flagged, ran,
                         torch.stack(history))
