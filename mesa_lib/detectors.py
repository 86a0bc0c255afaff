"""Backdoor detectors behind one interface, registered by name; each scores a whole model.

A detector searches, for every class of a model, the easiest trigger that sends other images to
that class, and gives each class a score: how much easier that class is to reach than the
model's typical class (larger = more suspicious; the model's median class scores 0). Whether a
score is large is NOT decided here: some classes are naturally easy (on CIFAR-10 a clean
ResNet-8's "deer" needs a much smaller mask than its other classes), so mesa_lib.calibration
compares each class with the same class in clean models.

- `mask` (Neural Cleanse's objective, Wang et al., S&P 2019; mesa_lib.masksearch): a full-image
  mask + pattern per class, x' = (1 - m) x + m p, minimising cross-entropy to the class +
  lambda |m|_1, lambda adjusted after every step; all classes in one batched computation. It is
  free of the trigger's place and size: a backdoor planted at a fixed corner, a 2x2 or a 5x5
  patch, or blended over the whole image, all show as a class whose smallest successful mask is
  much smaller than usual. Class score: median log |m|_1 over the
  classes minus the class's log |m|_1.
- `mesa` (MESA, Qiao et al., NeurIPS 2019, Sec. 4-5): one MESA sub-model per class, 3x3 triggers
  stamped at random places; each class scored by the ASR of its own samples on held-out images
  (mesa_lib.detect.score_classes). Class score: its ASR minus the median class's.

A detector is a `measure` of some classes (the scan service fans chunks of a model's classes out
over workers) and a `reduce` over all of them; a new one is one function with
`@register_detector(name, reduce)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mesa_lib.detect import DetectConfig, score_classes
from mesa_lib.masksearch import MaskSearchConfig, mask_search
from mesa_lib.mesa import MesaConfig


@dataclass(frozen=True)
class DetectorScore:
    """What one detector says about one model, before calibration.

    Attributes:
        detector: its registered name.
        scores: class -> score, larger = easier to reach than the model's median class.
        per_class: class -> the detector's raw evidence (e.g. mask L1, ASR).
        seconds: wall time of the search.
        samples: class -> a few recovered triggers (k, C, h, w) in [0, 1], for the evidence grid.
    """

    detector: str
    scores: dict[int, float]
    per_class: dict[int, dict[str, float]]
    seconds: float
    samples: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ScanSettings:
    """Everything the detectors need; its `fingerprint()` ties a calibration to it.

    Attributes:
        detectors: names of the detectors to run, in order.
        images: reference images used by each detector (a seeded subset of what is given).
        mask_steps, mask_batch_size, mask_lr, mask_asr: the mask search (MaskSearchConfig).
        mesa: the MESA detector's fit (one beta; sub-models = classes).
        mesa_eval_images: of `images`, held out to measure each class's ASR.
        trigger_size: side of the MESA detector's square triggers.
        seed: seed of every draw.
    """

    detectors: tuple[str, ...] = ("mask",)
    images: int = 512
    mask_steps: int = 200
    mask_batch_size: int = 8
    mask_lr: float = 0.1
    mask_asr: float = 0.9
    mesa: MesaConfig = field(default_factory=lambda: MesaConfig(betas=(0.8,), epochs=1,
                                                                batch_size=32, lr=0.002))
    mesa_eval_images: int = 200
    trigger_size: int = 3
    seed: int = 0

    def mask_config(self) -> MaskSearchConfig:
        """The mask search's settings."""
        return MaskSearchConfig(steps=self.mask_steps, batch_size=self.mask_batch_size,
                                lr=self.mask_lr, asr_threshold=self.mask_asr, seed=self.seed)

    def fingerprint(self) -> dict[str, object]:
        """The settings as plain JSON-able values (compared with a calibration's)."""
        m = self.mesa
        return {"detectors": list(self.detectors), "images": self.images,
                "mask_steps": self.mask_steps, "mask_batch_size": self.mask_batch_size,
                "mask_lr": self.mask_lr, "mask_asr": self.mask_asr,
                "mesa": {"betas": list(m.betas), "epochs": m.epochs, "batch_size": m.batch_size,
                         "lr": m.lr, "alpha": m.alpha, "hidden": m.hidden,
                         "mine_hidden": m.mine_hidden, "trigger_noise": m.trigger_noise},
                "mesa_eval_images": self.mesa_eval_images, "trigger_size": self.trigger_size,
                "seed": self.seed}


Evidence = dict[int, dict[str, float]]
"""class -> a detector's raw measurements of that class."""


@dataclass(frozen=True)
class Detector:
    """A detector in two halves, so that the classes of one model can be measured in chunks
    (in parallel, by the scan service) and reduced once over all of them.

    Attributes:
        measure: (model, images uint8 (N, C, H, W), labels (N,) or None, classes, number of the
            model's classes, settings, device) -> (evidence of those classes, trigger samples).
        reduce: evidence of every class -> class scores (the median class scores 0).
    """

    measure: Callable[..., tuple[Evidence, dict[int, Tensor]]]
    reduce: Callable[[Evidence], dict[int, float]]


DETECTORS: dict[str, Detector] = {}


def register_detector(name: str, reduce: Callable[[Evidence], dict[int, float]]):
    """Decorator registering a `measure` function with its `reduce` as detector `name`."""

    def add(measure: Callable[..., tuple[Evidence, dict[int, Tensor]]]):
        DETECTORS[name] = Detector(measure, reduce)
        return measure

    return add


def centred(evidence: Evidence, key: str, transform: Callable[[Tensor], Tensor]
            ) -> dict[int, float]:
    """Each class's transformed `key` minus the median over the model's classes."""
    classes = sorted(evidence)
    values = transform(torch.tensor([evidence[c][key] for c in classes], dtype=torch.float64))
    values = values - values.quantile(0.5)
    return {c: float(values[i]) for i, c in enumerate(classes)}


def _reduce_mask(evidence: Evidence) -> dict[int, float]:
    return centred(evidence, "mask_l1", lambda l1: -l1.clamp_min(1e-3).log())


def _reduce_mesa(evidence: Evidence) -> dict[int, float]:
    return centred(evidence, "asr", lambda asr: asr)


@register_detector("mask", _reduce_mask)
def measure_mask(model: nn.Module, images: Tensor, labels: Tensor | None,
                 classes: tuple[int, ...], n_classes: int, settings: ScanSettings,
                 device: torch.device) -> tuple[Evidence, dict[int, Tensor]]:
    """The mask search for `classes`: each one's smallest successful |m|_1 and its ASR."""
    res = mask_search(model, images, classes, settings.mask_config(), device)
    evidence = {c: {"mask_l1": float(res.l1[i]), "mask_asr": float(res.asr[i])}
                for i, c in enumerate(res.classes)}
    return evidence, {c: (res.masks[i] * res.patterns[i])[None]
                      for i, c in enumerate(res.classes)}


@register_detector("mesa", _reduce_mesa)
def measure_mesa(model: nn.Module, images: Tensor, labels: Tensor | None,
                 classes: tuple[int, ...], n_classes: int, settings: ScanSettings,
                 device: torch.device) -> tuple[Evidence, dict[int, Tensor]]:
    """MESA with one sub-model per class of `classes`: the ASR of each class's own samples."""
    config = DetectConfig(mesa=settings.mesa, candidates=classes,
                          eval_images=settings.mesa_eval_images, seed=settings.seed)
    shape = (images.shape[1], settings.trigger_size, settings.trigger_size)
    _, scores = score_classes(model, images, labels, classes, shape, config, device,
                              keep_samples=8)
    return {c: scores[c].record() for c in classes}, {c: scores[c].samples for c in classes}


def reference_subset(images: Tensor, labels: Tensor | None, settings: ScanSettings
                     ) -> tuple[Tensor, Tensor | None]:
    """The seeded subset of `settings.images` reference images every detector uses."""
    n = min(settings.images, len(images))
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
    pick = pick[:n].sort().values
    return images[pick], None if labels is None else labels[pick]


def measure(name: str, model: nn.Module, images: Tensor, labels: Tensor | None,
            classes: tuple[int, ...], n_classes: int, settings: ScanSettings,
            device: torch.device) -> tuple[Evidence, dict[int, Tensor], float]:
    """One detector's evidence on a chunk of classes: (evidence, samples, seconds)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}")
    start = time.perf_counter()
    x, y = reference_subset(images, labels, settings)
    evidence, samples = DETECTORS[name].measure(model, x, y, tuple(classes), n_classes,
                                                settings, device)
    return evidence, samples, time.perf_counter() - start


def reduce(name: str, evidence: Evidence, samples: dict[int, Tensor] | None = None,
           seconds: float = 0.0) -> DetectorScore:
    """One detector's class scores from the evidence of every class of the model."""
    scores = DETECTORS[name].reduce(evidence)
    per_class = {c: {"score": scores[c], **evidence[c]} for c in sorted(evidence)}
    return DetectorScore(name, scores, per_class, seconds, samples or {})


def run_detectors(model: nn.Module, images: Tensor, labels: Tensor | None, n_classes: int,
                  settings: ScanSettings, device: torch.device) -> dict[str, DetectorScore]:
    """Every detector of `settings` over all classes of the model, in one chunk.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits (B, n_classes); not changed.
        images: the defender's clean images, uint8 (N, C, H, W), any order; each detector uses
            the same seeded `settings.images` of them.
        labels: int64 (N,) true labels, or None (the model's own predictions stand in).
    """
    classes = tuple(range(n_classes))
    out = {}
    for name in settings.detectors:
        evidence, samples, seconds = measure(name, model, images, labels, classes, n_classes,
                                             settings, device)
        out[name] = reduce(name, evidence, samples, seconds)
    return out
