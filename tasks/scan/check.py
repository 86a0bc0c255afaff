"""Tasks of the scan service: check an arriving model safely, then fit MESA on chunks of classes.

`check_model` copies the candidate's files into the state folder (the drop folder and the registry
are only read) and runs every safety check before any scanning: no pickles ever (mesa_lib.modelio
sniffs magic bytes), manifest strictly validated, the architecture sized on the meta device and
bounded before it is built, weights checked against it (names, shapes, dtypes, NaN/Inf), class
count and input shape against the defender's reference data, and one finite forward pass. A
failed check is a *rejection*: a verdict with a reason, recorded like any other
(tasks.scan.record). `scan_chunk` fits one chunk of classes (mesa_lib.detect.score_classes) so
that the classes of a model fan out over the task runner; `repair_model` repairs a backdoored
model with the recovered trigger distribution (MESA Sec. 4.3) and re-scans it.

Tasks pass paths and small records (Candidate, Checked, ChunkResult), never tensors or modules.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from mesa_lib.data import DataError
from mesa_lib.detect import score_classes
from mesa_lib.modelio import Manifest, ModelFileError, load_model, save_model
from mesa_lib.repair import repair
from mesa_lib.seed import resolve_device
from tasks.common.configs import repair_config, scan_config, trigger_shape
from tasks.common.params import Params
from tasks.common.samplers import load_sampler, save_sampler
from tasks.scan.discover import REFERENCE_SUFFIX, Candidate, model_key
from tasks.scan.reference import load_reference, reference_batch

MODEL_STEM = "model"  # the copy of a candidate inside its work folder: model.safetensors, ...
_LOAD_ERRORS = (ModelFileError, DataError, ValueError, TypeError, RuntimeError, KeyError)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else the module logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mesa.scan")


def work_dir(params: Params, key: str) -> Path:
    """Folder of one model's copies and scan outputs inside the state folder."""
    return Path(params.scan.state_folder) / "work" / key


@dataclass(frozen=True)
class Checked:
    """Result of `check_model`: where the verified copy is, or why the model is rejected."""

    candidate: Candidate
    stem: str = ""
    reason: str = ""
    n_classes: int = 0
    reference: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class ChunkResult:
    """Scores of one chunk of classes: {class: {asr, entropy, mean_pairwise_distance}}."""

    classes: tuple[int, ...]
    scores: dict[int, dict[str, float]]
    samples: dict[int, list]  # class -> (grid, C, h, w) nested lists in [0, 1]
    sampler: str  # stem of the saved distribution ("" unless repair is on)
    seconds: float


def _copy(cand: Candidate, work: Path) -> dict[str, Path]:
    """Copy the candidate's model files to `work/model.*`; refuse if they changed meanwhile."""
    work.mkdir(parents=True, exist_ok=True)
    copies = {}
    for suffix in (".safetensors", ".json", REFERENCE_SUFFIX):
        src = cand.file(suffix)
        if src is not None:
            copies[suffix] = Path(shutil.copyfile(src, work / f"{MODEL_STEM}{suffix}"))
    if model_key(list(copies.values()))[0] != cand.key:
        raise RuntimeError(f"{cand.label}: files changed while being read; next run retries")
    return copies


def _unsupported(cand: Candidate) -> str:
    names = ", ".join(Path(f).name for f in cand.files)
    if cand.file(".json") is not None:
        return f"{names}: weights file <stem>.safetensors is missing"
    return (f"{names}: unsupported file; only <stem>.safetensors + <stem>.json models are "
            "accepted (pickled checkpoints such as .pt/.pth/.pkl/.bin are never loaded)")


def _reference_mismatch(manifest: Manifest, n_classes: int, shape: tuple[int, ...]) -> str:
    """Why the model cannot be scanned with the reference data, or "" if it can."""
    if manifest.num_classes != n_classes:
        return (f"class count {manifest.num_classes} in the manifest differs from the "
                f"{n_classes} classes of the reference data")
    if tuple(manifest.input_shape) != shape:
        return (f"input shape {list(manifest.input_shape)} differs from the reference "
                f"images' {list(shape)}")
    return ""


def _rejected(cand: Candidate, reason: str, work: Path, start: float) -> Checked:
    user_stem = cand.label.split(":", 1)[-1]  # name the user's files, not our copies
    reason = reason.replace(str(work / MODEL_STEM), user_stem)
    logger().warning("REJECTED %s: %s", cand.label, reason)
    return Checked(cand, reason=reason, seconds=time.perf_counter() - start)


# The @task functions only delegate: Dask ships a task's function by value (cloudpickle), and a
# body naming e.g. `.classes` would drag the unpicklable `torch.classes` module along.


@task(cache_policy=NO_CACHE)
def check_model(cand: Candidate, params: Params) -> Checked:
    """Copy and verify one candidate; a bad model is `rejected` with a reason, never loaded."""
    return _check(cand, params)


def _check(cand: Candidate, params: Params) -> Checked:
    start, work = time.perf_counter(), work_dir(params, cand.key)
    if cand.problem:
        return _rejected(cand, cand.problem, work, start)
    if cand.file(".safetensors") is None:
        return _rejected(cand, _unsupported(cand), work, start)
    copies = _copy(cand, work)
    stem, own_ref = work / MODEL_STEM, copies.get(REFERENCE_SUFFIX)
    try:
        ref = load_reference(params, own_ref)
    except DataError as err:
        if own_ref is None:
            raise  # the service's reference data is broken: not this model's fault
        return _rejected(cand, f"reference data: {err}", work, start)
    try:
        # pickles, oversize architectures (sized on the meta device), shapes, NaN/Inf, ...
        model, manifest = load_model(stem)
        reason = _reference_mismatch(manifest, len(ref.classes), tuple(ref.images.shape[1:]))
        if reason:
            return _rejected(cand, reason, work, start)
        with torch.no_grad():
            out = model(ref.images[:2].float().div(255))
        if out.shape != (2, manifest.num_classes) or not torch.isfinite(out).all():
            return _rejected(cand, f"forward pass gives {tuple(out.shape)} / non-finite logits",
                             work, start)
    except _LOAD_ERRORS as err:
        return _rejected(cand, str(err), work, start)
    logger().info("checked %s: %s, %d classes", cand.label, manifest.architecture,
                  manifest.num_classes)
    return Checked(cand, str(stem), "", manifest.num_classes, str(own_ref or ""),
                   time.perf_counter() - start)


def _batch(params: Params, checked: Checked) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    ref = load_reference(params, Path(checked.reference) if checked.reference else None)
    images, labels = reference_batch(ref, params.scan.n_images, params.base.seed)
    return images, labels, int(ref.images.shape[1])


@task(cache_policy=NO_CACHE)
def scan_chunk(checked: Checked, classes: tuple[int, ...], params: Params) -> ChunkResult:
    """Fit MESA for one chunk of a model's classes and score each class."""
    return fit_chunk(checked, classes, params)


def fit_chunk(checked: Checked, classes: tuple[int, ...], params: Params) -> ChunkResult:
    """The body of `scan_chunk` (also the re-scan after a repair)."""
    start, device = time.perf_counter(), resolve_device(params.base.device)
    model, _ = load_model(checked.stem, map_location=device)
    images, labels, channels = _batch(params, checked)
    config = replace(scan_config(params, checked.n_classes), candidates=tuple(classes))
    shape = trigger_shape(params.scan.trigger_size, channels)
    dist, scores = score_classes(model, images, labels, tuple(classes), shape, config,
                                device, params.scan.grid_samples)
    sampler = ""
    if params.scan.repair:
        sampler = str(work_dir(params, checked.candidate.key) / f"sampler_{classes[0]}")
        save_sampler(Path(sampler), dist)
    logger().info("%s: classes %s fitted in %.1f s", checked.candidate.label, list(classes),
                  time.perf_counter() - start)
    return ChunkResult(tuple(classes),
                       {c: {"asr": s.asr, "entropy": s.entropy,
                            "mean_pairwise_distance": s.mean_pairwise_distance}
                        for c, s in scores.items()},
                       {c: s.samples.cpu().tolist() for c, s in scores.items()}, sampler,
                       time.perf_counter() - start)


def repair_model(checked: Checked, chunks: list[ChunkResult], target: int, params: Params,
                 lineage: dict[str, str]) -> tuple[Path, list[ChunkResult]] | None:
    """Repair with the target's recovered triggers (labels kept true), save, re-scan all classes.

    Returns:
        (stem of the repaired model, its re-scan as one chunk), or None without labels.
    """
    device = resolve_device(params.base.device)
    images, labels, channels = _batch(params, checked)
    if labels is None:
        logger().warning("%s: no labels in the reference data, cannot repair",
                         checked.candidate.label)
        return None
    chunk = next(c for c in chunks if target in c.classes)
    sampler = load_sampler(Path(chunk.sampler), device).for_target(target)
    model, manifest = load_model(checked.stem, map_location=device)
    repair(model, images, labels, sampler, repair_config(params), device)
    out = work_dir(params, checked.candidate.key) / "repaired"
    extra = {**manifest.extra, "repair": "mesa", **lineage}
    save_model(model, out, replace(manifest, extra=extra))
    rescan = Checked(checked.candidate, str(out), "", checked.n_classes, checked.reference)
    no_repair = params.model_copy(update={"scan": params.scan.model_copy(update={"repair": False})})
    return out, [fit_chunk(rescan, tuple(range(checked.n_classes)), no_repair)]
