"""The scan's computations, split so that the classes of one model can be fitted in parallel.

`mesa_lib.detect.detect` fits one MESA sub-model per class in ONE batched fit and decides at once.
To fan the classes of a model out over Prefect task runners (threads, Dask), the same procedure is
cut in two here: `scan_classes` fits a chunk of classes and measures each class's ASR and breadth
exactly as `detect` does (same split of the images, same seeded draws, so one chunk of all classes
reproduces `detect`'s scores, which a test checks), and `decide` applies `detect`'s decision rule
to the ASRs of every class (MAD anomaly index, Qiao et al. NeurIPS 2019 Sec. 5 / Neural Cleanse):

    margin_k = min(anomaly_k - anomaly_threshold, (asr_k - min_asr) / confidence_scale)
    backdoored iff max_k margin_k > 0, target = argmax_k margin_k, confidence = sigmoid(|max|)

Both belong in mesa_lib.detect (they only use torch and mesa_lib); they live here until it grows
this split. Also the defender's reference data: the pipeline's defender split, a CIFAR archive,
or an `.npz` given with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from mesa_lib.data import DataError, default_source, load_cifar, split_defender
from mesa_lib.detect import DetectConfig, class_asr
from mesa_lib.distribution import TriggerDistribution
from mesa_lib.mesa import fit_mesa, frozen
from mesa_lib.metrics import anomaly_index, knn_entropy, mean_pairwise_distance
from tasks import catalog
from tasks.config import Params
from tasks.io import load_npz, seeded_subset


@dataclass(frozen=True)
class Reference:
    """The defender's clean images: uint8 (N, C, H, W), int64 labels (N,) or None, class names."""

    images: Tensor
    labels: Tensor | None
    classes: tuple[str, ...]
    source: str


def _npz_reference(path: Path) -> Reference:
    """`images`/`labels`/`classes` arrays, or the pipeline's `defender_*` split (no pickles)."""
    try:
        arrays = load_npz(path)
    except (OSError, ValueError) as err:
        raise DataError(f"reference data {path}: not a readable npz without pickles ({err})"
                        ) from None
    prefix = "defender_" if "defender_images" in arrays else ""
    images, labels = arrays.get(f"{prefix}images"), arrays.get(f"{prefix}labels")
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"reference data {path}: `{prefix}images` must be uint8 (N, C, H, W)")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != images.shape[:1]
                               or labels.is_floating_point()):
        raise DataError(f"reference data {path}: `{prefix}labels` must be integers (N,)")
    labels = None if labels is None else labels.long()
    names = arrays.get("classes")
    if names is not None:
        classes = tuple(str(c) for c in names.tolist())
    elif labels is not None:
        classes = tuple(str(k) for k in range(int(labels.max()) + 1))
    else:
        raise DataError(f"reference data {path}: needs `classes` or `labels`")
    return Reference(images, labels, classes, str(path))


def _auto_reference(params: Params) -> Reference:
    """The pipeline's defender split if built, else the same split decoded from the archive."""
    if catalog.path("dataset").is_file():
        return _npz_reference(catalog.path("dataset"))
    from tasks.data import resolve_archive  # the data stage's choice of archive

    try:
        source = resolve_archive(catalog.DATA_DIR, params.data.archive, params.data.name)
    except DataError:
        source = default_source(Path.cwd())
    data = load_cifar(source, params.data.name, catalog.CACHE_DIR)
    defender, _ = split_defender(data.test, params.data.n_defender, params.base.seed + 1)
    return Reference(defender.images, defender.labels, defender.classes, str(source))


@lru_cache(maxsize=4)
def _cached(spec: str, stamp: int, params: Params) -> Reference:
    return _auto_reference(params) if spec == "auto" else _npz_reference(Path(spec))


def load_reference(params: Params, override: Path | None = None) -> Reference:
    """The model's own `.data.npz` if given, else `scan.reference` (cached per process)."""
    spec = str(override) if override else params.scan.reference
    if spec != "auto" and not spec.endswith(".npz"):  # a CIFAR archive or folder
        data = load_cifar(Path(spec), params.data.name, catalog.CACHE_DIR)
        defender, _ = split_defender(data.test, params.data.n_defender, params.base.seed + 1)
        return Reference(defender.images, defender.labels, defender.classes, spec)
    target = catalog.path("dataset") if spec == "auto" else Path(spec)
    stamp = target.stat().st_mtime_ns if target.is_file() else 0
    return _cached(spec, stamp, params)


def reference_batch(ref: Reference, n_images: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """A seeded subset of n_images, shuffled: `detect` holds out the LAST images for the ASR."""
    order = seeded_subset(n_images, len(ref.images), seed + 2)
    order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))]
    return ref.images[order], None if ref.labels is None else ref.labels[order]


@dataclass(frozen=True)
class ClassScore:
    """One class's evidence: ASR of its own trigger samples, their breadth, a few samples."""

    asr: float
    entropy: float
    mean_pairwise_distance: float
    samples: Tensor  # (grid, C, h, w) noise-free samples in [0, 1]


def scan_classes(
    model: nn.Module, images: Tensor, labels: Tensor | None, classes: tuple[int, ...],
    trigger_shape: tuple[int, int, int], config: DetectConfig, device: torch.device, grid: int,
) -> tuple[TriggerDistribution, dict[int, ClassScore]]:
    """Fit MESA for `classes` and score each, as `mesa_lib.detect.detect` does.

    Args:
        model: classifier, float (B, C, H, W) in [0, 1] -> logits (B, K).
        images: the defender's clean images, uint8 (N, C, H, W); the last `eval_images` (at most
            half) are held out to measure ASR. labels: int64 (N,) or None.
        classes: the candidate classes of this chunk.
        grid: samples per class kept for the PNG grid.

    Returns:
        The fitted distribution (sub-models of `classes`) and each class's `ClassScore`.
    """
    n_eval = min(config.eval_images, len(images) // 2)
    fit_x, eval_x = images[: len(images) - n_eval], images[len(images) - n_eval :]
    eval_y = None if labels is None else labels[len(images) - n_eval :]
    dist = fit_mesa(model, fit_x, list(classes), trigger_shape, config.mesa, device)
    gen = torch.Generator().manual_seed(config.seed)
    out = {}
    with frozen(model):
        for c in classes:
            asr, smp = class_asr(model, dist, c, eval_x, eval_y, config.samples, device, gen)
            out[c] = ClassScore(asr, knn_entropy(smp), mean_pairwise_distance(smp), smp[:grid])
    return dist, out


def decide(asr: dict[int, float], config: DetectConfig) -> dict:
    """`detect`'s decision over every class's ASR.

    Returns:
        {"status": "clean" | "backdoored", "target": int | None, "confidence": float in [0, 1],
         "anomaly": {class: float}, "margin": {class: float}}.
    """
    classes = sorted(asr)
    asr_t = torch.tensor([asr[c] for c in classes])
    anomaly = anomaly_index(asr_t, config.mad_floor)
    margin = torch.minimum(anomaly - config.anomaly_threshold,
                           (asr_t - config.min_asr) / config.confidence_scale)
    best = int(margin.argmax())
    flagged = bool(margin[best] > 0)
    return {"status": "backdoored" if flagged else "clean",
            "target": classes[best] if flagged else None,
            "confidence": 1 / (1 + math.exp(-abs(float(margin[best])))),
            "anomaly": {c: float(anomaly[i]) for i, c in enumerate(classes)},
            "margin": {c: float(margin[i]) for i, c in enumerate(classes)}}


def chunks(n_classes: int, parts: int) -> list[tuple[int, ...]]:
    """Classes 0..n-1 cut into `parts` contiguous, nearly equal chunks (no empty one)."""
    parts = max(1, min(parts, n_classes))
    bounds = [round(i * n_classes / parts) for i in range(parts + 1)]
    return [tuple(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
