"""Metrics of a backdoor defence: clean accuracy, ASR of the original and held-out triggers,
breadth of a recovered trigger distribution, and the MAD anomaly index.

- ASR follows Qiao, Yang, Li (NeurIPS 2019, Sec. 5): share of non-target images classified as the
  target once a trigger is stamped (`mesa_lib.evaluate.attack_success_rate`). Held-out variants
  (other canonical 3x3 patterns near the original, contrast/colour-shifted copies) probe whether a
  repair removed the backdoor's neighbourhood or only one point of it, the paper's motivation.
- Breadth: mean pairwise L2 distance of sampled triggers, and the Kozachenko-Leonenko k-NN
  entropy estimate H = psi(n) - psi(k) + log V_d + (d / n) sum_i log eps_i (Kozachenko &
  Leonenko 1987; Kraskov et al. 2004, eq. 20), with eps_i the distance to the k-th neighbour and
  V_d the volume of the unit d-ball; in nats, -> -inf as a distribution collapses.
- Anomaly index (Neural Cleanse, Wang et al., S&P 2019, Sec. IV-C): (x - median) / (1.4826 MAD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mesa_lib.distribution import TriggerDistribution
from mesa_lib.evaluate import accuracy, attack_success_rate
from mesa_lib.triggers import canonical_patterns, pattern_trigger

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's std


def anomaly_index(values: Tensor, min_scale: float = 1e-12) -> Tensor:
    """Signed MAD anomaly index of each value: (K,) float -> (K,), (x - median) / (1.4826 MAD).

    `min_scale` floors the denominator, so that values which barely differ (e.g. classes that
    all have ASR 0) do not turn a modest outlier into an astronomically large index.
    """
    v = values.float()
    med = v.median()
    mad = (v - med).abs().median() * MAD_CONSISTENCY
    return (v - med) / mad.clamp_min(min_scale)


def mean_pairwise_distance(samples: Tensor) -> float:
    """Mean L2 distance between distinct samples (n, ...) -> float; 0 for n < 2."""
    if len(samples) < 2:
        return 0.0
    return float(torch.pdist(samples.flatten(1).double()).mean())


def knn_entropy(samples: Tensor, k: int = 1, eps: float = 1e-10) -> float:
    """Kozachenko-Leonenko entropy estimate in nats of samples (n, ...) flattened to (n, d)."""
    x = samples.flatten(1).double()
    n, d = x.shape
    if n <= k:
        raise ValueError(f"need more than k={k} samples, got {n}")
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(math.inf)
    radius = dist.kthvalue(k, dim=1).values.clamp_min(eps)
    log_unit_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64))
    return float(digamma[0] - digamma[1] + log_unit_ball + d * radius.log().mean())


def submodel_breadth(
    dist: TriggerDistribution, n: int = 256, generator: torch.Generator | None = None
) -> list[dict[str, float]]:
    """Per sub-model: beta, target, k-NN entropy and mean pairwise distance of n noise-free
    samples (the generator's own spread, without the fixed Gaussian noise)."""
    out = []
    for i in range(dist.n_models):
        smp = dist.sample_submodel(i, n, generator, noise=False).cpu()
        out.append({"beta": float(dist.betas[i]), "target": int(dist.targets[i]),
                    "entropy": knn_entropy(smp), "mean_pairwise_distance":
                    mean_pairwise_distance(smp)})
    return out


def other_patterns(pattern: Tensor, count: int, channels: int = 3) -> dict[str, Tensor]:
    """The `count` canonical 3x3 patterns nearest to `pattern` (Hamming distance up to symmetry),
    the pattern's own class excluded: name -> trigger (channels, 3, 3)."""
    pats = canonical_patterns(pattern.shape[-1])
    p = pattern.float()
    views = [torch.rot90(v, k, (0, 1)) for v in (p, p.flip(1)) for k in range(4)]
    views += [1 - v for v in views]
    ham = torch.stack([(pats - v).abs().sum((1, 2)) for v in views]).min(0).values
    order = [int(i) for i in torch.argsort(ham, stable=True) if ham[i] > 0][:count]
    return {f"pattern{i}": pattern_trigger(pats[i], channels) for i in order}


def colour_shifts(
    trigger: Tensor, levels: tuple[float, ...] = (0.1, 0.2, 0.3)
) -> dict[str, Tensor]:
    """Colour-shifted copies of a trigger (C, h, w) in [0, 1]: reduced contrast (values squeezed
    toward grey by each level) and, for 3 channels, red/green/blue tints of it."""
    out = {f"contrast{d:g}": trigger * (1 - 2 * d) + d for d in levels}
    if trigger.shape[0] == 3:
        for c, name in enumerate(("red", "green", "blue")):
            tint = torch.full((3, 1, 1), 0.7)
            tint[c] = 1.0
            out[f"tint_{name}"] = trigger * tint
    return out


def held_out_variants(pattern: Tensor, count: int = 5, channels: int = 3) -> dict[str, Tensor]:
    """The standard held-out set: the nearest other canonical patterns plus colour shifts."""
    return {**other_patterns(pattern, count, channels),
            **colour_shifts(pattern_trigger(pattern, channels))}


def is_black_white(trigger: Tensor) -> bool:
    """True for a black/white pattern repeated over the channels (C, h, w) in {0, 1}."""
    return bool(((trigger == 0) | (trigger == 1)).all()) and bool((trigger == trigger[:1]).all())


def evaluation_triggers(
    trigger: Tensor, variants: int = 0, shifts: bool = False
) -> dict[str, Tensor]:
    """The attacker's trigger (C, h, w) as "original", plus held-out variants by name.

    Args:
        variants: the nearest other canonical patterns (black/white square triggers only).
        shifts: also the contrast / tint shifted copies of the trigger.
    """
    out = {"original": trigger}
    square = trigger.shape[-1] == trigger.shape[-2]
    if variants and square and is_black_white(trigger):
        out |= other_patterns(trigger[0], variants, trigger.shape[0])
    if shifts:
        out |= colour_shifts(trigger)
    return out


def backdoor_report(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    trigger: Tensor,
    target: int,
    device: torch.device,
    variants: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Clean accuracy, ASR of the original trigger and of each held-out variant.

    Args:
        images: uint8 (N, C, H, W) evaluation images; labels: int64 (N,).
        trigger: the attacker's trigger (C, h, w) in [0, 1].
        variants: name -> trigger (C, h, w); their ASRs are reported as `asr_<name>` and averaged
            as `asr_variants`.

    Returns:
        {"clean_acc", "asr", ["asr_variants", "asr_<name>"...]} floats in [0, 1].
    """
    out = {"clean_acc": accuracy(model, images, labels, device),
           "asr": attack_success_rate(model, images, labels, trigger, target, device, seed=seed)}
    if variants:
        per = {f"asr_{k}": attack_success_rate(model, images, labels, v, target, device,
                                               seed=seed) for k, v in variants.items()}
        out["asr_variants"] = sum(per.values()) / len(per)
        out.update(per)
    return out
