"""What the demo pipeline's recover, baseline and repair stages share: the scan of the
backdoored model and the triggers it recovered, exactly as the scan service sees them.

The pipeline is not told the target or the trigger's shape. It scans its backdoored model on the
defender's images with the calibrated scanner (as `mesa-scan` and the scan service do), and
every flagged target's trigger is recovered on the selection part of those images
(tasks.scan.defend.prepare). `recover.geometry` says where MESA models the triggers: `scan`,
each recovered trigger's geometry (mesa_lib.geometry), or `anywhere`, the paper's assumption of
`recover.trigger_size`-square triggers at random places: one geometry among others.

`artifacts/recover/recovered/found.json` records the scan and what was recovered (beside it, one
MESA distribution and sample grid per flagged target); the later stages
recover the same triggers again (deterministic: same model, images, seed) and refuse to go on
if they differ from that record.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mesa_lib.geometry import anywhere
from mesa_lib.verdict import Verdict
from tasks.common import catalog
from tasks.common.configs import scan_settings
from tasks.common.io import read_json
from tasks.common.params import Params
from tasks.scan.core import load_calibration, measure_chunk, verdict_of
from tasks.scan.defend import Prepared, prepare
from tasks.scan.reference import Reference, reference_batch


def defender_reference(data: dict[str, Any]) -> Reference:
    """The defender's 8,000 (n_defender) labelled images as the scanner's reference."""
    return Reference(data["defender_images"], data["defender_labels"],
                     tuple(str(c) for c in data["classes"]), "the defender's images")


def calibration_of(params: Params) -> Any:
    """The released calibration the scan's verdicts are made against."""
    return load_calibration(Path(params.scan.calibration), scan_settings(params))


def scan(model: nn.Module, ref: Reference, params: Params, device: torch.device) -> Verdict:
    """The calibrated verdict on `model`, measured as `mesa-scan` measures it."""
    images, labels = reference_batch(ref, params.scan.images, params.base.seed)
    chunk = measure_chunk(model, images, labels, tuple(range(len(ref.classes))),
                          scan_settings(params), device, keep=0)
    return verdict_of([chunk], calibration_of(params))


def prepared(model: nn.Module, ref: Reference, targets: tuple[int, ...], detector: str,
             params: Params, device: torch.device) -> Prepared:
    """The scan service's split and recovered triggers, each placed by `recover.geometry`."""
    ready = prepare(model, ref, targets, detector, params, device)
    if params.recover.geometry == "scan":
        return ready
    size = (params.recover.trigger_size, params.recover.trigger_size)
    return replace(ready, found=[replace(r, geometry=anywhere(size)) for r in ready.found])


def found_record(verdict: Verdict, ready: Prepared | None) -> dict[str, Any]:
    """JSON of the scan and of every flagged target's geometry (`found_path`)."""
    return {"verdict": verdict.status, "p_value": verdict.p_value, "detector": verdict.detector,
            "targets": [r.target for r in ready.found] if ready else [],
            "geometries": {str(r.target): r.geometry.record() for r in ready.found}
            if ready else {},
            "images": ready.splits.sizes() if ready else {}}


def found_path() -> Path:
    """The index of artifact `recovered`: the scan and every flagged target's geometry."""
    return catalog.path("recovered") / "found.json"


def fresh_folder(name: str) -> Path:
    """Catalog folder `name`, emptied (a target flagged by an earlier run must not linger)."""
    folder = catalog.path(name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _placement(geometry: dict[str, Any]) -> tuple:
    """What decides where triggers go (the evidence numbers left out)."""
    return tuple(geometry[k] for k in ("kind", "size", "location", "spread"))


def recovered_again(model: nn.Module, ref: Reference, params: Params,
                    device: torch.device) -> Prepared | None:
    """The recover stage's triggers, recovered again (None: the scan flagged nothing).

    Raises:
        RuntimeError: they are placed otherwise than recover/recovered/found.json says (stale
            artifacts, or other settings since the recover stage ran).
    """
    record = read_json(found_path())
    if not record["targets"]:
        return None
    ready = prepared(model, ref, tuple(record["targets"]), record["detector"], params, device)
    now = {str(r.target): _placement(r.geometry.record()) for r in ready.found}
    then = {t: _placement(g) for t, g in record["geometries"].items()}
    if now != then:
        raise RuntimeError(f"{found_path()}: the triggers recovered now ({now}) are "
                           f"placed otherwise than the recover stage's ({then}); run `dvc "
                           "repro` to refit them")
    return ready


def target_stem(folder: str, target: int) -> Path:
    """`<catalog folder>/target_<k>`: the stem of flagged target k's sampler and grid."""
    return catalog.path(folder) / f"target_{target}"
