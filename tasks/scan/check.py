"""Tasks of the scan service: check an arriving model safely, then run the detectors on chunks
of its classes.

`check_model` copies the candidate's files into the state folder (the drop folder and the registry
are only read) and runs every safety check before any scanning: no pickles ever (mesa_lib.modelio
sniffs magic bytes), manifest strictly validated, the architecture sized on the meta device and
bounded before it is built, weights checked against it (names, shapes, dtypes, NaN/Inf), class
count and input shape against the defender's reference data, and one finite forward pass
(tasks.scan.core.inspect, the same checks `mesa-scan` makes). A failed check is a *rejection*: a
verdict with a reason, recorded like any other (tasks.scan.record). `scan_chunk` runs every
detector on one chunk of classes (tasks.scan.core.measure_chunk) so that the classes of a model
fan out over the task runner; `repair_model` repairs a backdoored model against every flagged
target's triggers, recovered by the detector that fired, and verifies it on images neither the
scan nor the repair used (tasks.scan.defend, mesa_lib.defence).

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

from mesa_lib import modelfiles
from mesa_lib.calibration import Calibration
from mesa_lib.data import DataError
from mesa_lib.modelfiles import MANIFEST_SUFFIX, WEIGHTS_SUFFIX
from mesa_lib.modelio import ModelFileError, save_model
from mesa_lib.seed import resolve_device
from tasks.common.configs import scan_settings
from tasks.common.escape import escape
from tasks.common.params import Params
from tasks.scan.core import ChunkResult, Rejected, inspect, measure_chunk
from tasks.scan.defend import Repaired, repair_scanned
from tasks.scan.discover import (
    REFERENCE_SUFFIX,
    SIGNATURE_SUFFIX,
    Candidate,
    model_format,
    model_key,
)
from tasks.scan.hygiene import manifest_problem
from tasks.scan.reference import load_reference, reference_batch
from tasks.scan.signing import SignatureError, trusted_keys, verify

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
    signature: str = ""  # "verified: key <fingerprint>" when it arrived signed

    @property
    def ok(self) -> bool:
        return not self.reason


def _copy(cand: Candidate, work: Path) -> dict[str, Path]:
    """Copy the candidate's files to `work/model.*` (a folder model's into `work/model/` under
    their own names); refuse if they changed meanwhile. Returns role or suffix -> copy."""
    work.mkdir(parents=True, exist_ok=True)
    copies = {}
    if cand.folder:
        (work / MODEL_STEM).mkdir(exist_ok=True)
        for name in model_format(Path(cand.folder)).suffixes:  # a folder's file names
            copies[name] = Path(shutil.copyfile(Path(cand.folder) / name,
                                                work / MODEL_STEM / name))
        suffixes: tuple[str, ...] = (REFERENCE_SUFFIX, SIGNATURE_SUFFIX)
    else:
        suffixes = (*modelfiles.format_of(cand.weights() or MODEL_STEM).suffixes,
                    REFERENCE_SUFFIX, SIGNATURE_SUFFIX)
    for suffix in suffixes:
        src = cand.file(suffix)
        if src is not None:
            copies[suffix] = Path(shutil.copyfile(src, work / f"{MODEL_STEM}{suffix}"))
    if model_key(list(copies.values()))[0] != cand.key:
        raise RuntimeError(f"{cand.label}: files changed while being read; next run retries")
    return copies


def _unsupported(cand: Candidate) -> str:
    names = ", ".join(Path(f).name for f in cand.files)
    if cand.file(MANIFEST_SUFFIX) is not None:
        return f"{names}: weights file <stem>{WEIGHTS_SUFFIX} is missing"
    return (f"{names}: unsupported file; only <stem>{WEIGHTS_SUFFIX} + <stem>{MANIFEST_SUFFIX}, "
            "<stem>.onnx and Hugging Face / timm folders (config.json + model.safetensors) are "
            "accepted (pickled checkpoints such as .pt/.pth/.pkl/.bin are never loaded)")


def _rejected(cand: Candidate, reason: str, work: Path, start: float) -> Checked:
    """A rejection whose reason names the user's file (escaped: it may quote their names and
    manifest strings), never our copy of it."""
    user_stem = cand.label.split(":", 1)[-1]  # escaped when the label was made
    reason = escape(reason).replace(escape(work / MODEL_STEM), user_stem)
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
    if cand.weights() is None:
        return _rejected(cand, _unsupported(cand), work, start)
    copies = _copy(cand, work)
    stem, own_ref = work / MODEL_STEM, copies.get(REFERENCE_SUFFIX)
    try:
        signature = _verify_signature(cand, copies, work, params)
    except SignatureError as err:
        return _rejected(cand, str(err), work, start)
    problem = manifest_problem(stem, str(work / MODEL_STEM))
    if problem:
        return _rejected(cand, problem, work, start)
    try:
        ref = load_reference(params, own_ref)
    except DataError as err:
        if own_ref is None:
            raise  # the service's reference data is broken: not this model's fault
        return _rejected(cand, f"reference data: {err}", work, start)
    try:
        # pickles, oversize architectures (sized on the meta device), shapes, NaN/Inf, ...
        _, manifest = inspect(stem, len(ref.classes), tuple(ref.images.shape[1:]),
                              ref.images[:2], torch.device("cpu"))
    except Rejected as err:
        return _rejected(cand, str(err), work, start)
    except _LOAD_ERRORS as err:
        return _rejected(cand, f"{stem}: {err}", work, start)
    except RecursionError:  # a nested structure the depth check did not see
        return _rejected(cand, f"{stem}.json: too deeply nested to parse; refused", work, start)
    logger().info("checked %s: %s, %d classes", cand.label, manifest.architecture,
                  manifest.num_classes)
    return Checked(cand, str(stem), "", manifest.num_classes, str(own_ref or ""),
                   time.perf_counter() - start, signature)


def _verify_signature(cand: Candidate, copies: dict[str, Path], work: Path,
                      params: Params) -> str:
    """Verify the signature a model arrived with ('' if none; SignatureError if it fails).

    The signature covers the files by their own names, so the checked copies are staged under
    the names they arrived with."""
    sig = copies.get(SIGNATURE_SUFFIX)
    if sig is None:
        return ""
    staged = work / "arrived"
    staged.mkdir(exist_ok=True)
    if cand.folder:  # the signature covers the folder's files by their names
        own = Path(cand.folder).name
        shutil.copytree(work / MODEL_STEM, staged / own, dirs_exist_ok=True)
    else:
        own = modelfiles.stem(cand.weights() or MODEL_STEM).name
        for suffix in modelfiles.format_of(cand.weights() or MODEL_STEM).suffixes:
            if suffix in copies:
                shutil.copyfile(copies[suffix], staged / f"{own}{suffix}")
    shown = Path(cand.file(SIGNATURE_SUFFIX) or sig).name
    try:
        key = verify(staged / own, sig, trusted_keys(params))
    except SignatureError as err:
        raise SignatureError(str(err).replace(str(sig), shown)) from None
    logger().info("%s: signature %s verified (key %s)", cand.label, escape(shown), key)
    return f"verified: signed by key {key}"


def _batch(params: Params, checked: Checked) -> tuple[torch.Tensor, torch.Tensor | None]:
    ref = load_reference(params, Path(checked.reference) if checked.reference else None)
    return reference_batch(ref, params.scan.images, params.base.seed)


@task(cache_policy=NO_CACHE)
def scan_chunk(checked: Checked, classes: tuple[int, ...], params: Params) -> ChunkResult:
    """Run every detector on one chunk of a model's classes."""
    return fit_chunk(checked, classes, params)


def fit_chunk(checked: Checked, classes: tuple[int, ...], params: Params) -> ChunkResult:
    """The body of `scan_chunk` (also the re-scan after a repair)."""
    start, device = time.perf_counter(), resolve_device(params.base.device)
    model, _ = modelfiles.load(checked.stem, map_location=device)
    images, labels = _batch(params, checked)
    result = measure_chunk(model, images, labels, tuple(classes), scan_settings(params), device,
                           params.scan.grid_samples)
    logger().info("%s: classes %s measured in %.1f s", checked.candidate.label,
                  list(classes), time.perf_counter() - start)
    return result


def repair_model(checked: Checked, targets: tuple[int, ...], detector: str, params: Params,
                 calibration: Calibration, lineage: dict[str, str]) -> tuple[Path, Repaired]:
    """Repair against every flagged target's recovered triggers (mesa_lib.defence), verify on
    images neither the scan nor the repair saw, save the repaired pair.

    Returns:
        (stem of the repaired model, the repair's outcome and re-scan).

    Raises:
        CannotRepair: the reference data cannot support a repair (no labels, too few images).
    """
    device = resolve_device(params.base.device)
    ref = load_reference(params, Path(checked.reference) if checked.reference else None)
    model, manifest = modelfiles.load(checked.stem, map_location=device)
    done = repair_scanned(model, ref, targets, detector, params, calibration, device)
    out = work_dir(params, checked.candidate.key) / "repaired"
    extra = {**manifest.extra, "repair": f"{done.outcome.method} against {detector} triggers",
             **lineage}
    save_model(model, out, replace(manifest, extra=extra))
    return out, done
