"""Backdoor detection by scanning every candidate class with MESA.

Qiao, Yang, Li, NeurIPS 2019, Sec. 4 / 5: when the target is unknown, a sub-model is fitted for
every candidate class. For the backdoored class the generator finds triggers that fire on most
images (high ASR) and spread widely; for clean classes a small patch rarely overrides the image.
`score_classes`: one `fit_mesa` call models a set of classes together (sub-models = classes x
betas, one batched computation), and each class is scored by the ASR of its own samples on a
seeded random held-out part of the images. `decide`: the class whose ASR is an outlier (MAD
anomaly index, as in Neural Cleanse, Wang et al. S&P 2019) and high in absolute terms is named
the target. Breadth (k-NN entropy, mean pairwise distance) is reported per class as evidence.
`detect` = `score_classes` over every candidate + `decide`; the scan service (tasks/scan/)
scores chunks of classes in parallel and decides once over all of them.

Decision: margin_k = min(anomaly_k - anomaly_threshold, (asr_k - min_asr) / confidence_scale);
"backdoored" iff max_k margin_k > 0, target = argmax; confidence = sigmoid(|max margin|). The
result is mesa_lib.verdict.Verdict, uncalibrated (no p-value), its evidence under
`per_class["mesa"]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mesa_lib.distribution import TriggerDistribution
from mesa_lib.evaluate import predict
from mesa_lib.mesa import MesaConfig, autocast_for, fit_mesa, frozen
from mesa_lib.metrics import anomaly_index, knn_entropy, mean_pairwise_distance
from mesa_lib.triggers import random_locations, stamp
from mesa_lib.verdict import Verdict


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
class ClassScore:
    """One candidate class's evidence, from `score_classes`.

    Attributes:
        asr: in [0, 1], share of held-out images of other classes that the class's own sampled
            triggers send to it.
        entropy: k-NN entropy in nats of its `config.samples` noise-free trigger samples.
        mean_pairwise_distance: mean L2 distance between those samples.
        samples: the first `keep_samples` of them, float (n, C, h, w) in [0, 1], on the CPU.
    """

    asr: float
    entropy: float
    mean_pairwise_distance: float
    samples: Tensor

    def record(self) -> dict[str, float]:
        """The scalar evidence: {"asr", "entropy", "mean_pairwise_distance"}."""
        return {"asr": self.asr, "entropy": self.entropy,
                "mean_pairwise_distance": self.mean_pairwise_distance}


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
    trig = sub.sample(len(x), gen, noise=True).cpu()  # as the classifier saw them in the fit
    loc = random_locations(len(x), tuple(x.shape[-2:]), tuple(trig.shape[-2:]), gen)
    preds = []
    for i in range(0, len(x), 500):  # one trigger per image: stamp here, predict in chunks
        xi = stamp(x[i : i + 500].to(device).float().div(255), trig[i : i + 500].to(device),
                   loc[i : i + 500])
        with torch.no_grad(), autocast_for(device):
            preds.append(model(xi).argmax(1).cpu())
    asr = float((torch.cat(preds) == cls).float().mean()) if preds else 0.0
    return asr, sub.sample(samples, gen, noise=False).cpu()


def split_holdout(
    images: Tensor, labels: Tensor | None, eval_images: int, seed: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Hold a seeded random `eval_images` of the images (at most half) out of the fit.

    A random draw, not a slice: defender sets are often grouped by class, and a held-out tail
    would then hold one or two classes only (whose own ASR cannot be measured: images of the
    candidate class itself are excluded). The same seed gives the same split, so every chunk of
    a scan measures ASR on the same images.

    Args:
        images: uint8 (N, C, H, W).
        labels: int64 (N,) or None.
        eval_images: images to hold out; capped at N // 2.
        seed: seed of the permutation.

    Returns:
        (fit images (N - n, C, H, W), held images (n, C, H, W), their labels (n,) or None), each
        in the original order.
    """
    n = min(eval_images, len(images) // 2)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    held, fit = perm[:n].sort().values, perm[n:].sort().values
    held_y = None if labels is None else labels[held.to(labels.device)]
    return images[fit.to(images.device)], images[held.to(images.device)], held_y


def score_classes(
    model: nn.Module, images: Tensor, labels: Tensor | None, classes: tuple[int, ...],
    trigger_shape: tuple[int, int, int], config: DetectConfig, device: torch.device,
    keep_samples: int = 0,
) -> tuple[TriggerDistribution, dict[int, ClassScore]]:
    """Fit MESA for `classes` in one batched fit and score each class on held-out images.

    The classes of one model may be scored in several calls (the scan service fans chunks of
    them out): all calls hold out the same images (`split_holdout` with `config.seed`), but the
    fit and the draws depend on the chunk, so a class's scores differ a little between chunkings.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits (B, K).
        images: the defender's clean images, uint8 (N, C, H, W), in any order: a random
            `config.eval_images` of them (at most half) are held out of the fit to measure ASR.
        labels: int64 (N,) true labels of `images`, or None (then the model's predictions).
        classes: the candidate classes to fit and score.
        trigger_shape: (C, h, w) of the triggers to search.
        config: settings (`config.candidates` is not read: `classes` are scored).
        device: where to run.
        keep_samples: noise-free samples kept per class in `ClassScore.samples`.

    Returns:
        The fitted distribution (sub-models of `classes`) and each class's `ClassScore`.
    """
    fit_x, eval_x, eval_y = split_holdout(images, labels, config.eval_images, config.seed)
    dist = fit_mesa(model, fit_x, list(classes), trigger_shape, config.mesa, device)
    gen = torch.Generator().manual_seed(config.seed)
    out = {}
    with frozen(model):
        for c in classes:
            asr, smp = class_asr(model, dist, c, eval_x, eval_y, config.samples, device, gen)
            out[c] = ClassScore(asr, knn_entropy(smp), mean_pairwise_distance(smp),
                                smp[:keep_samples])
    return dist, out


def decide(scores: Mapping[int, Mapping[str, float]], config: DetectConfig) -> Verdict:
    """The decision over every candidate class: is one class's ASR a high outlier?

    margin_k = min(anomaly_k - anomaly_threshold, (asr_k - min_asr) / confidence_scale), with
    anomaly_k the MAD anomaly index of asr_k among all classes; "backdoored" iff the largest
    margin is positive, target = its class, confidence = sigmoid(|largest margin|).

    Args:
        scores: class -> {"asr": float in [0, 1], any further evidence (carried through)}; all
            candidate classes of the model (the anomaly index compares them).
        config: the thresholds.

    Returns:
        A `Verdict` (no p-value) whose `per_class["mesa"]` holds the given scores plus
        "anomaly" and "margin".
    """
    classes = sorted(scores)
    asr = torch.tensor([float(scores[c]["asr"]) for c in classes])
    anomaly = anomaly_index(asr, config.mad_floor)
    margin = torch.minimum(anomaly - config.anomaly_threshold,
                           (asr - config.min_asr) / config.confidence_scale)
    best = int(margin.argmax())
    flagged = bool(margin[best] > 0)
    confidence = 1 / (1 + math.exp(-abs(float(margin[best]))))
    out = {c: {**scores[c], "anomaly": float(anomaly[i]), "margin": float(margin[i])}
           for i, c in enumerate(classes)}
    top = out[classes[best]]
    reason = (f"class {classes[best]} is hijacked by {top['asr']:.0%} of its recovered triggers "
              f"(anomaly index {top['anomaly']:.1f})") if flagged else "no class stands out"
    summary = {"statistic": float(margin[best]), "target": classes[best]}
    return Verdict("backdoored" if flagged else "clean", classes[best] if flagged else None,
                   None, confidence, "mesa", reason, {"mesa": summary}, {"mesa": out})


def detect(
    model: nn.Module,
    images: Tensor,
    trigger_shape: tuple[int, int, int],
    config: DetectConfig,
    device: torch.device,
    labels: Tensor | None = None,
) -> Verdict:
    """Decide whether `model` carries a backdoor and name its target: `score_classes` + `decide`.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits (B, K).
        images: the defender's clean images, uint8 (N, C, H, W), in any order; a seeded random
            `eval_images` of them (at most half) are held out of the fit to measure ASR.
        trigger_shape: (C, h, w) of the triggers to search.
        config: settings.
        device: where to run.
        labels: optional int64 (N,) true labels of `images` (else the model's predictions).

    Returns:
        A `Verdict`; its `per_class["mesa"]` holds "asr", "anomaly", "margin", "entropy" and
        "mean_pairwise_distance" of each candidate class.
    """
    classes = config.candidates or tuple(range(_num_classes(model, images, device)))
    _, scores = score_classes(model, images, labels, classes, trigger_shape, config, device)
    return decide({c: s.record() for c, s in scores.items()}, config)
