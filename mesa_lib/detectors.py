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

A registry entry (`Detector`) is a name, a frozen config dataclass whose defaults are the shipped
settings, and its functions: `measure` some classes (the scan service fans chunks of a model's
classes out over workers), `reduce` over all of them, and the `trigger_source` a repair uses
against a class it flagged: the trigger as recovered and its geometry (mesa_lib.geometry). A
new detector is one module with one `@register_detector` call;
params.yaml then takes a block `scan.detectors.<name>` checked against the config's fields
(tasks/common/plugins.py), and a calibration's fingerprint holds the config as it ran.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from mesa_lib import plugins
from mesa_lib.detect import DetectConfig, score_classes
from mesa_lib.geometry import Family, Geometry, GeometryConfig, Placed, Recovered, anywhere
from mesa_lib.geometry import geometry_of as mask_geometry
from mesa_lib.masksearch import MaskSearchConfig, mask_search
from mesa_lib.mesa import MesaConfig, fit_mesa, frozen


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
class MesaDetectorConfig:
    """The MESA detector: one sub-model per class at one beta, scored by the ASR of its samples.

    Attributes:
        beta, epochs, batch_size, lr, alpha, trigger_noise: the fit (mesa_lib.mesa.MesaConfig).
        hidden: width of the generators and of MINE.
        eval_images: of the scan's images, held out to measure each class's ASR.
        trigger_size: side of the square triggers searched.
        seed: seed of every draw (a scan fills in its own).
    """

    beta: float = field(default=0.8, metadata={"gt": 0, "le": 1})
    epochs: int = field(default=1, metadata={"ge": 1})
    batch_size: int = field(default=32, metadata={"ge": 2})
    lr: float = field(default=0.002, metadata={"gt": 0})
    hidden: int = field(default=512, metadata={"ge": 1})
    alpha: float = field(default=0.1, metadata={"ge": 0})
    trigger_noise: float = field(default=0.1, metadata={"ge": 0})
    eval_images: int = field(default=100, metadata={"ge": 2})
    trigger_size: int = field(default=3, metadata={"ge": 1, "le": 16})
    seed: int = 0

    def mesa(self) -> MesaConfig:
        """The fit's MesaConfig."""
        return MesaConfig(betas=(self.beta,), epochs=self.epochs, batch_size=self.batch_size,
                          lr=self.lr, alpha=self.alpha, hidden=self.hidden,
                          mine_hidden=self.hidden, trigger_noise=self.trigger_noise,
                          seed=self.seed)

    def shape(self, channels: int) -> tuple[int, int, int]:
        """(C, h, w) of the triggers searched."""
        return (channels, self.trigger_size, self.trigger_size)


Evidence = dict[int, dict[str, float]]
"""class -> a detector's raw measurements of that class."""


@dataclass(frozen=True)
class Detector:
    """A registered detector.

    Attributes:
        name: what params.yaml, verdicts and calibrations call it.
        config: its frozen config dataclass; the defaults are the shipped settings. A field
            named `seed` is filled with the scan's seed.
        measure: (model, images uint8 (N, C, H, W), labels (N,) or None, classes, config,
            device) -> (evidence of those classes, class -> recovered triggers (k, C, h, w)).
        reduce: evidence of every class -> class scores (the median class scores 0).
        trigger_source: (model, images, labels, target, config, device) -> (the trigger it
            recovers for that target, a `Family`; its `Geometry`, where a repair's triggers go).
        check: (config, scan images) -> a problem with the combination, or None.
    """

    name: str
    config: type
    measure: Callable[..., tuple[Evidence, dict[int, Tensor]]]
    reduce: Callable[[Evidence], dict[int, float]]
    trigger_source: Callable[..., tuple[Family, Geometry]]
    check: Callable[[Any, int], str | None] = lambda config, images: None


DETECTORS: dict[str, Detector] = {}


def register_detector(name: str, config: type, reduce: Callable[[Evidence], dict[int, float]],
                      trigger_source: Callable[..., tuple[Family, Geometry]],
                      check: Callable[[Any, int], str | None] | None = None):
    """Decorator registering a `measure` function as detector `name` with its other parts."""

    def add(measure: Callable[..., tuple[Evidence, dict[int, Tensor]]]):
        DETECTORS[name] = Detector(name, config, measure, reduce, trigger_source,
                                   check or Detector.check)
        return measure

    return add


def detector(name: str) -> Detector:
    """The registered detector `name`; an unknown name is an error listing the known ones."""
    if name not in DETECTORS and not plugins.load(plugins.DETECTORS, name):
        known = sorted(set(DETECTORS) | plugins.names(plugins.DETECTORS))
        raise ValueError(f"unknown detector {name!r}; known: {known}")
    return DETECTORS[name]


def registered() -> dict[str, Detector]:
    """Every detector: the registry with all the plug-ins of the entry points loaded."""
    plugins.load_all(plugins.DETECTORS)
    return dict(DETECTORS)


def with_seed(config: Any, seed: int) -> Any:
    """`config` with its `seed` field (if it has one) set to `seed`."""
    names = {f.name for f in fields(config)}
    return replace(config, seed=seed) if "seed" in names else config


def plain(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON values (tuples as lists), without its seed."""
    out = json.loads(json.dumps(asdict(config)))
    out.pop("seed", None)
    return out


@dataclass(frozen=True)
class ScanSettings:
    """Everything the detectors need; its `fingerprint()` ties a calibration to it.

    Attributes:
        detectors: name -> its config, in the order they run.
        images: reference images used by each detector (a seeded subset of what is given).
        seed: seed of every draw (each config's `seed` is set to it).
    """

    detectors: Mapping[str, Any] = field(default_factory=lambda: {"mask": MaskSearchConfig()})
    images: int = 512
    seed: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        """The detectors run, in order."""
        return tuple(self.detectors)

    def config(self, name: str) -> Any:
        """Detector `name`'s config with the scan's seed."""
        if name not in self.detectors:
            raise ValueError(f"detector {name!r} is not in these settings ({self.names})")
        return with_seed(self.detectors[name], self.seed)

    def fingerprint(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (compared with a calibration's)."""
        return {"detectors": {n: plain(c) for n, c in self.detectors.items()},
                "images": self.images, "seed": self.seed}


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


def _others(model: nn.Module, images: Tensor, labels: Tensor | None, target: int,
            device: torch.device, limit: int = 512) -> Tensor:
    """Up to `limit` images of classes other than `target` (by label, else by the model's
    prediction), float (n, C, H, W) in [0, 1] on `device`."""
    x = images[:4 * limit].to(device).float().div(255)
    if labels is None:
        with torch.no_grad():
            keep = model(x).argmax(1) != target
    else:
        keep = labels[:4 * limit].to(device) != target
    return x[keep][:limit]


def _mask_trigger(model: nn.Module, images: Tensor, labels: Tensor | None, target: int,
                  config: MaskSearchConfig, device: torch.device) -> tuple[Family, Geometry]:
    """The target's smallest successful mask and pattern (Neural Cleanse's unlearning trigger)
    and the geometry of its support (mesa_lib.geometry)."""
    found = mask_search(model, images, (target,), config, device)
    gen = torch.Generator().manual_seed(config.seed)
    with frozen(model):
        geometry = mask_geometry(model, _others(model, images, labels, target, device),
                                 found.masks[0], found.patterns[0], target, GeometryConfig(), gen)
    return found.trigger(target), geometry


def _mesa_triggers(model: nn.Module, images: Tensor, labels: Tensor | None, target: int,
                   config: MesaDetectorConfig, device: torch.device) -> tuple[Family, Geometry]:
    """MESA's distribution of the target's triggers (Sec. 4.3), square patches anywhere."""
    shape = config.shape(images.shape[1])
    geometry = anywhere(shape[1:])
    return Placed(fit_mesa(model, images, target, shape, config.mesa(), device), geometry), \
        geometry


def _mesa_check(config: MesaDetectorConfig, images: int) -> str | None:
    if 2 * config.eval_images > images:
        return (f"eval_images: expected <= scan.images / 2 ({images // 2}), "
                f"got {config.eval_images}")
    return None


@register_detector("mask", MaskSearchConfig, _reduce_mask, _mask_trigger)
def measure_mask(model: nn.Module, images: Tensor, labels: Tensor | None,
                 classes: tuple[int, ...], config: MaskSearchConfig,
                 device: torch.device) -> tuple[Evidence, dict[int, Tensor]]:
    """The mask search for `classes`: each one's smallest successful |m|_1 and its ASR."""
    res = mask_search(model, images, classes, config, device)
    evidence = {c: {"mask_l1": float(res.l1[i]), "mask_asr": float(res.asr[i])}
                for i, c in enumerate(res.classes)}
    return evidence, {c: (res.masks[i] * res.patterns[i])[None]
                      for i, c in enumerate(res.classes)}


@register_detector("mesa", MesaDetectorConfig, _reduce_mesa, _mesa_triggers, _mesa_check)
def measure_mesa(model: nn.Module, images: Tensor, labels: Tensor | None,
                 classes: tuple[int, ...], config: MesaDetectorConfig,
                 device: torch.device) -> tuple[Evidence, dict[int, Tensor]]:
    """MESA with one sub-model per class of `classes`: the ASR of each class's own samples."""
    detect = DetectConfig(mesa=config.mesa(), candidates=classes,
                          eval_images=config.eval_images, seed=config.seed)
    _, scores = score_classes(model, images, labels, classes, config.shape(images.shape[1]),
                              detect, device, keep_samples=8)
    return {c: scores[c].record() for c in classes}, {c: scores[c].samples for c in classes}


def reference_subset(images: Tensor, labels: Tensor | None, settings: ScanSettings
                     ) -> tuple[Tensor, Tensor | None]:
    """The seeded subset of `settings.images` reference images every detector uses."""
    n = min(settings.images, len(images))
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(settings.seed))
    pick = pick[:n].sort().values
    return images[pick], None if labels is None else labels[pick]


def measure(name: str, model: nn.Module, images: Tensor, labels: Tensor | None,
            classes: tuple[int, ...], settings: ScanSettings, device: torch.device
            ) -> tuple[Evidence, dict[int, Tensor], float]:
    """One detector's evidence on a chunk of classes: (evidence, samples, seconds)."""
    entry = detector(name)
    start = time.perf_counter()
    x, y = reference_subset(images, labels, settings)
    evidence, samples = entry.measure(model, x, y, tuple(classes), settings.config(name), device)
    return evidence, samples, time.perf_counter() - start


def reduce(name: str, evidence: Evidence, samples: dict[int, Tensor] | None = None,
           seconds: float = 0.0) -> DetectorScore:
    """One detector's class scores from the evidence of every class of the model."""
    scores = detector(name).reduce(evidence)
    per_class = {c: {"score": scores[c], **evidence[c]} for c in sorted(evidence)}
    return DetectorScore(name, scores, per_class, seconds, samples or {})


def trigger_source(name: str, model: nn.Module, images: Tensor, labels: Tensor | None,
                   target: int, settings: ScanSettings, device: torch.device) -> Recovered:
    """The trigger detector `name` recovers for `target`, and where a repair's triggers go."""
    trigger, geometry = detector(name).trigger_source(model, images, labels, target,
                                                      settings.config(name), device)
    return Recovered(target, name, trigger, geometry)


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
    for name in settings.names:
        evidence, samples, seconds = measure(name, model, images, labels, classes, settings,
                                             device)
        out[name] = reduce(name, evidence, samples, seconds)
    return out
