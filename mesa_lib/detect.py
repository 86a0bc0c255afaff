"""Backdoor detection by scanning every candidate class with MESA.

Qiao, Yang, Li, NeurIPS 2019, Sec. 4 / 5: when the target is unknown, a sub-model is fitted for
every candidate class. For the backdoored class the generator finds triggers that fire on most
images (high ASR) and spread widely; for clean classes a small patch rarely overrides the image.
One `fit_mesa` call models all classes together (sub-models = classes x betas, one batched
computation). Each class is then scored by the ASR of its own samples on held images; the class
whose ASR is an outlier (MAD anomaly index, as in Neural Cleanse, Wang et al. S&P 2019) and high
in absolute terms is named the target. Breadth (k-NN entropy, mean pairwise distance) is
reported per class as evidence.

Decision: margin_k = min(anomaly_k - anomaly_threshold, (asr_k - min_asr) / confidence_scale);
"backdoored" iff max_k margin_k > 0, target = argmax; confidence = sigmoid(|max margin|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mesa_lib.distribution import TriggerDistribution
from mesa_lib.evaluate import predict
from mesa_lib.mesa import MesaConfig, autocast_for, fit_mesa, frozen
from mesa_lib.metrics import anomaly_index, knn_entropy, mean_pairwise_distance
from mesa_lib.triggers import random_locations, stamp


@dataclass(frozen=True)
class DetectConfig:
    """Detection settings: a lighter MESA fit (one beta, fewer epochs) plus decision thresholds.

    Attributes:
        mesa: the scan's MESA settings (all candidate classes in one fit).
        candidates: classes to scan; None = every class of the model.
        eval_images: held images (from the defender's set) used to measure each class's ASR.
        samples: triggers drawn per class (ASR and breadth).
        anomaly_threshold: MAD anomaly index of a class's ASR above which it is an outlier.
        mad_floor: floor of the anomaly index's scale (1.4826 MAD), in ASR units.
        min_asr: ASR a class must also reach to be called the target.
        confidence_scale: ASR margin that counts as one unit of the anomaly margin.
        seed: seed of the draws made after fitting.
    """

    mesa: MesaConfig = field(default_factory=lambda: MesaConfig(betas=(0.8,), epochs=3))
    candidates: tuple[int, ...] | None = None
    eval_images: int = 1000
    samples: int = 256
    anomaly_threshold: float = 2.0
    mad_floor: float = 0.02
    min_asr: float = 0.3
    confidence_scale: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Verdict:
    """Outcome of `detect`.

    Attributes:
        status: "clean" or "backdoored".
        target: the named target class, None when clean.
        confidence: in [0, 1], confidence in `status`.
        scores: class -> {"asr", "anomaly", "margin", "entropy", "mean_pairwise_distance"}.
    """

    status: Literal["clean", "backdoored"]
    target: int | None
    confidence: float
    scores: dict[int, dict[str, float]]


def _num_classes(model: nn.Module, images: Tensor, device: torch.device) -> int:
    with torch.no_grad(), frozen(model):
        return int(model(images[:1].to(device).float().div(255)).shape[1])


def class_asr(
    model: nn.Module, dist: TriggerDistribution, cls: int, images: Tensor, labels: Tensor | None,
    samples: int, device: torch.device, gen: torch.Generator,
) -> tuple[float, Tensor]:
    """ASR of class `cls`'s own samples: each non-`cls` image gets one sampled trigger.

    Args:
        images: uint8 (N, C, H, W); labels: int64 (N,) or None (then images predicted as `cls`
            without a trigger are excluded instead).

    Returns:
        (ASR in [0, 1], the `samples` noise-free triggers drawn for breadth).
    """
    sub = dist.for_target(cls)
    keep = (labels != cls) if labels is not None else (predict(model, images, device) != cls)
    x = images[keep.cpu()]
    trig = sub.sample(len(x), gen).cpu()
    loc = random_locations(len(x), tuple(x.shape[-2:]), tuple(trig.shape[-2:]), gen)
    preds = []
    for i in range(0, len(x), 500):  # one trigger per image: stamp here, predict in chunks
        xi = stamp(x[i : i + 500].to(device).float().div(255), trig[i : i + 500].to(device),
                   loc[i : i + 500])
        with torch.no_grad(), autocast_for(device):
            preds.append(model(xi).argmax(1).cpu())
    asr = float((torch.cat(preds) == cls).float().mean()) if preds else 0.0
    return asr, sub.sample(samples, gen, noise=False).cpu()


def detect(
    model: nn.Module,
    images: Tensor,
    trigger_shape: tuple[int, int, int],
    config: DetectConfig,
    device: torch.device,
    labels: Tensor | None = None,
) -> Verdict:
    """Decide whether `model` carries a backdoor and name its target.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits (B, K).
        images: the defender's clean images, uint8 (N, C, H, W); the last `eval_images` of them
            (at most half) are held out of the fit to measure ASR.
        trigger_shape: (C, h, w) of the triggers to search.
        config: settings.
        device: where to run.
        labels: optional int64 (N,) true labels of `images` (else the model's predictions).

    Returns:
        A `Verdict`.
    """
    n_eval = min(config.eval_images, len(images) // 2)
    fit_x, eval_x = images[: len(images) - n_eval], images[len(images) - n_eval :]
    eval_y = None if labels is None else labels[len(images) - n_eval :]
    classes = config.candidates or tuple(range(_num_classes(model, images, device)))
    dist = fit_mesa(model, fit_x, list(classes), trigger_shape, config.mesa, device)
    gen = torch.Generator().manual_seed(config.seed)
    asr, breadth, entropy = [], [], []
    with frozen(model):
        for c in classes:
            a, smp = class_asr(model, dist, c, eval_x, eval_y, config.samples, device, gen)
            asr.append(a)
            breadth.append(mean_pairwise_distance(smp))
            entropy.append(knn_entropy(smp))
    asr_t = torch.tensor(asr)
    anomaly = anomaly_index(asr_t, config.mad_floor)
    margin = torch.minimum(anomaly - config.anomaly_threshold,
                           (asr_t - config.min_asr) / config.confidence_scale)
    best = int(margin.argmax())
    flagged = bool(margin[best] > 0)
    confidence = 1 / (1 + math.exp(-abs(float(margin[best]))))
    scores = {c: {"asr": asr[i], "anomaly": float(anomaly[i]), "margin": float(margin[i]),
                  "entropy": entropy[i], "mean_pairwise_distance": breadth[i]}
              for i, c in enumerate(classes)}
    return Verdict("backdoored" if flagged else "clean", classes[best] if flagged else None,
                   confidence, scores)
