"""A scan's repair, shared by `mesa-scan --repair`, the scan service and the demo pipeline
(mesa_lib.defence).

The reference images are cut into repair / selection / verification parts, the verification and
selection parts drawn from the images the scan did not measure; every flagged target's trigger
is recovered on the selection part by the detector that fired; the model is repaired and then
verified on the verification part, re-scanned there with the calibrated scanner. Between repair
rounds (`repair.rounds`) the repaired model is scanned on the selection part (`standing_out`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mesa_lib.calibration import Calibration
from mesa_lib.defence import Again, Outcome, Splits, defend, split
from mesa_lib.detectors import trigger_source
from mesa_lib.geometry import Family, Recovered
from mesa_lib.seed import derive_seed
from mesa_lib.train import EpochCallback
from mesa_lib.verdict import Verdict
from tasks.common.configs import defence_config, scan_settings
from tasks.common.params import Params
from tasks.scan.core import ChunkResult, measure_chunk, verdict_of
from tasks.scan.reference import Reference, scan_indices


class CannotRepair(ValueError):
    """The reference data cannot support a repair (no labels, too few images)."""


@dataclass(frozen=True)
class Repaired:
    """A repair's outcome, the re-scan's evidence (its chunk, for the record) and the parts of
    the reference images each step used."""

    outcome: Outcome
    rescan: list[ChunkResult]
    splits: Splits
    scanned: Tensor


@dataclass(frozen=True)
class Prepared:
    """What a repair starts from: the reference's parts and every flagged target's recovered
    trigger and geometry (recovered on the selection part)."""

    found: list[Recovered]
    splits: Splits
    scanned: Tensor


def prepare(model: nn.Module, ref: Reference, targets: tuple[int, ...], detector: str,
            params: Params, device: torch.device) -> Prepared:
    """Split the reference images and recover each flagged target's trigger (deterministic:
    the same inputs give the same parts and triggers).

    Args:
        targets: the classes the scan flagged (`Verdict.targets`); detector: the one that fired.

    Raises:
        CannotRepair: the reference has no labels or too few images to split.
    """
    if ref.labels is None:
        raise CannotRepair(f"reference data {ref.source} has no labels: a repair keeps true "
                           "labels, so it needs them")
    seed = params.base.seed
    scanned = scan_indices(ref, params.scan.images, seed)
    try:  # the defender's own fit / validation split, as the reproduction's (mesa_lib.seed)
        parts = split(len(ref.images), scanned, params.repair.verification,
                      params.repair.selection, derive_seed(seed, "validation_split"))
    except ValueError as err:
        raise CannotRepair(str(err)) from None
    sel_x, sel_y = ref.images[parts.selection], ref.labels[parts.selection]
    settings = scan_settings(params)
    found = [trigger_source(detector, model, sel_x, sel_y, t, settings, device)
             for t in targets]
    return Prepared(found, parts, scanned)


def standing_out(verdict: Verdict, again_p: float, recheck: tuple[int, ...] = ()
                 ) -> tuple[int, ...]:
    """The classes a next repair round recovers triggers for: every class the scan of the
    repaired model flags, or, when it flags none, its top class if the p-value is below
    `again_p` (a model repaired a minute ago that does not look like a typical clean one);
    then every class of `recheck` not among them (repair.recheck: the targets repaired so far,
    whose true trigger may work while the recovered one no longer does)."""
    if verdict.status == "backdoored":
        out = verdict.targets
    elif verdict.p_value is not None and verdict.p_value < again_p:
        out = (int(verdict.detectors[verdict.detector]["target"]),)
    else:
        out = ()
    return out + tuple(dict.fromkeys(c for c in recheck if c not in out))


def recover_again(ref: Reference, prepared: Prepared, params: Params,
                  calibration: Calibration, device: torch.device) -> Again:
    """Between rounds: scan the repaired model on the selection part (never the verification
    part) and recover the triggers of `standing_out`: a class that stands out by the scan
    with the detector that stands out; a repaired target added by `repair.recheck` with the
    detector that found it."""
    settings = scan_settings(params)
    sel_x, sel_y = ref.images[prepared.splits.selection], ref.labels[prepared.splits.selection]
    classes = tuple(range(len(ref.classes)))
    repaired = {r.target: r.detector for r in prepared.found}  # grows with every round

    def again(model: nn.Module, n: int) -> list[Recovered]:
        verdict = verdict_of([measure_chunk(model, sel_x, sel_y, classes, settings, device,
                                            params.scan.grid_samples)], calibration)
        by_scan = standing_out(verdict, params.repair.again_p)
        recheck = tuple(repaired) if params.repair.recheck else ()
        found = [trigger_source(verdict.detector if t in by_scan else repaired[t],
                                model, sel_x, sel_y, t, settings, device)
                 for t in standing_out(verdict, params.repair.again_p, recheck)]
        for r in found:
            repaired.setdefault(r.target, r.detector)
        return found

    return again


def repair_prepared(model: nn.Module, ref: Reference, prepared: Prepared, params: Params,
                    calibration: Calibration, device: torch.device,
                    families: list[Family | None] | None = None,
                    callback: EpochCallback | None = None) -> Repaired:
    """Repair `model` IN PLACE against `prepared.found`, then verify it on the verification
    part, re-scanned there with the calibrated scanner.

    Args:
        families: each target's triggers when fitted beforehand (mesa_lib.defence.defend);
            then one round (later rounds' triggers would have to be fitted here).
        callback: the fine-tuning's per-epoch statistics.
    """
    settings = scan_settings(params)
    chunks: list[ChunkResult] = []

    def rescan(m: nn.Module, x: Tensor, y: Tensor) -> Verdict:
        chunks[:] = [measure_chunk(m, x, y, tuple(range(len(ref.classes))), settings, device,
                                   params.scan.grid_samples)]
        return verdict_of(chunks, calibration)

    config = defence_config(params)
    if families is not None:
        config = replace(config, rounds=1)
    outcome = defend(model, ref.images, ref.labels, prepared.splits, prepared.found, config,
                     device, rescan, families, callback,
                     recover_again(ref, prepared, params, calibration, device))
    return Repaired(outcome, chunks, prepared.splits, prepared.scanned)


def repair_scanned(model: nn.Module, ref: Reference, targets: tuple[int, ...], detector: str,
                   params: Params, calibration: Calibration, device: torch.device) -> Repaired:
    """`prepare`, then `repair_prepared`: the scan service's and `mesa-scan --repair`'s repair.

    Raises:
        CannotRepair: the reference has no labels or too few images to split.
    """
    return repair_prepared(model, ref, prepare(model, ref, targets, detector, params, device),
                           params, calibration, device)
