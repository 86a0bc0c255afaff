"""Task of the `recover` stage: scan the backdoored model, then fit MESA's staircase of trigger
generators (mesa_lib.mesa) over each flagged target's trigger geometry (tasks.pipeline.defence).

MESA is fitted on the repair part of the defender's images, as the scan service's repair fits
it (mesa_lib.defence.repair_family); its distributions are saved for the repair stage.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from prefect import task

from mesa_lib.defence import repair_family
from mesa_lib.mesa import MesaEpochStats
from mesa_lib.metrics import submodel_breadth
from mesa_lib.modelio import load_model
from tasks.common import catalog, tracking
from tasks.common.configs import defence_config
from tasks.common.io import CsvLog, load_npz, save_grid, write_json
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.defence import (
    defender_reference,
    found_path,
    found_record,
    fresh_folder,
    prepared,
    scan,
    target_stem,
)
from tasks.pipeline.samplers import save_sampler


def _sink(run: StageRun, target: int, betas: tuple[float, ...], csv: CsvLog):
    log = tracking.epoch_logger(run, f"mesa_target{target}")

    def callback(s: MesaEpochStats) -> None:
        values = {"target_prob_mean": sum(s.target_prob) / len(s.target_prob),
                  "mutual_info_mean": sum(s.mutual_info) / len(s.mutual_info),
                  "seconds": s.seconds}
        for b, p, h, mi in zip(betas, s.target_prob, s.hinge, s.mutual_info, strict=True):
            values |= {f"target_prob_b{b:g}": p, f"hinge_b{b:g}": h, f"mutual_info_b{b:g}": mi}
        log(s.epoch, values)
        csv.append({"epoch": s.epoch, "target": target, **values})

    return callback


@task
def fit_distribution(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Scan the backdoored model; fit and save MESA for every flagged target; a PNG grid."""
    model, _ = load_model(catalog.path("backdoored"), map_location=device)
    ref = defender_reference(load_npz(catalog.path("dataset")))
    verdict = scan(model, ref, params, device)
    flagged = verdict.targets if verdict.status == "backdoored" else ()
    ready = prepared(model, ref, flagged, verdict.detector, params, device) if flagged else None
    fresh_folder("recovered")
    write_json(found_path(), found_record(verdict, ready))
    metrics: dict[str, Any] = {"scan": {"backdoored": int(bool(flagged)),
                                        "p_value": verdict.p_value},
                               "targets": len(flagged)}
    csv = CsvLog(catalog.path("recover_curve"))
    if ready is None:
        csv.path.write_text("", encoding="utf-8")
        return metrics
    config = replace(defence_config(params), method="mesa")
    images = ref.images[ready.splits.repair]
    for found in ready.found:
        placed = repair_family("mesa", model, images, found, config, device,
                               _sink(run, found.target, params.recover.betas, csv))
        dist, stem = placed.sampler, target_stem("recovered", found.target)
        save_sampler(stem, dist)
        gen = torch.Generator().manual_seed(params.base.seed)
        save_grid(stem.with_suffix(".png"),  # what the model saw: with the fit's noise
                  dist.sample(params.recover.grid_samples, gen, noise=True))
        breadth = submodel_breadth(dist, 256, torch.Generator().manual_seed(params.base.seed))
        metrics[f"target_{found.target}"] = {
            "geometry": found.geometry.kind, "size": list(found.geometry.size),
            **{f"beta_{sub['beta']:g}": {"entropy": sub["entropy"],
                                         "mean_pairwise_distance": sub["mean_pairwise_distance"]}
               for sub in breadth}}
    return metrics
