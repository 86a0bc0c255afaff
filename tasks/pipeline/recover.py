"""Task of the `recover` stage: fit MESA's staircase of trigger generators (mesa_lib.mesa)."""

from __future__ import annotations

from typing import Any

import torch
from prefect import task

from mesa_lib.data import seeded_subset
from mesa_lib.mesa import MesaEpochStats, fit_mesa
from mesa_lib.metrics import submodel_breadth
from mesa_lib.modelio import load_model
from mesa_lib.seed import derive_seed
from tasks.common import catalog, tracking
from tasks.common.configs import mesa_config, trigger_shape
from tasks.common.io import CsvLog, load_npz, save_grid
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.samplers import save_sampler


def _sink(run: StageRun, betas: tuple[float, ...], csv: CsvLog):
    log = tracking.epoch_logger(run, "mesa")

    def callback(s: MesaEpochStats) -> None:
        values = {"target_prob_mean": sum(s.target_prob) / len(s.target_prob),
                  "mutual_info_mean": sum(s.mutual_info) / len(s.mutual_info),
                  "seconds": s.seconds}
        for b, p, h, mi in zip(betas, s.target_prob, s.hinge, s.mutual_info, strict=True):
            values |= {f"target_prob_b{b:g}": p, f"hinge_b{b:g}": h, f"mutual_info_b{b:g}": mi}
        log(s.epoch, values)
        csv.append({"epoch": s.epoch, **values})

    return callback


@task
def fit_distribution(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Fit MESA on the defender's images against the backdoored model; save it and a PNG grid."""
    model, _ = load_model(catalog.path("backdoored"), map_location=device)
    data = load_npz(catalog.path("dataset"))
    images = data["defender_images"]
    seed = derive_seed(params.base.seed, "fit_subset")
    images = images[seeded_subset(params.recover.n_images, len(images), seed)]
    shape = trigger_shape(params.recover.trigger_size, images.shape[1])
    dist = fit_mesa(model, images, params.poison.target, shape, mesa_config(params), device,
                    _sink(run, params.recover.betas, CsvLog(catalog.path("recover_curve"))))
    save_sampler(catalog.path("distribution"), dist)
    gen = torch.Generator().manual_seed(params.base.seed)
    grid = dist.sample(params.recover.grid_samples, gen, noise=True)  # what the model saw
    save_grid(catalog.path("recover_grid"), grid)
    metrics: dict[str, Any] = {"images": len(images)}
    for sub in submodel_breadth(dist, 256, torch.Generator().manual_seed(params.base.seed)):
        metrics[f"beta_{sub['beta']:g}"] = {"entropy": sub["entropy"],
                                            "mean_pairwise_distance":
                                            sub["mean_pairwise_distance"]}
    return metrics
