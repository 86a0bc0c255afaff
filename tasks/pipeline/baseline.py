"""Task of the `baseline` stage: the single-point baseline of the paper (Sec. 5.2).

K triggers optimised in pixel space from random starts (mesa_lib.baselines.fit_point), then the
backdoored model repaired against them exactly like MESA's repair (same `repair.*` settings,
`baseline.repair_epochs` epochs).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task

from mesa_lib.baselines import fit_point
from mesa_lib.data import seeded_subset
from mesa_lib.modelio import load_model
from mesa_lib.seed import derive_seed
from tasks.common import catalog
from tasks.common.configs import point_config, trigger_shape
from tasks.common.io import load_npz, save_grid
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.repair import repair_with
from tasks.pipeline.samplers import save_sampler


@task
def point_baseline(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Optimise the point triggers, save them, repair against them; return metrics."""
    b = params.baseline
    model, _ = load_model(catalog.path("backdoored"), map_location=device)
    images = load_npz(catalog.path("dataset"))["defender_images"]
    images = images[seeded_subset(b.n_images, len(images),
                                  derive_seed(params.base.seed, "fit_subset"))]
    shape = trigger_shape(params.recover.trigger_size, images.shape[1])
    points = fit_point(model, images, params.poison.target, shape, point_config(params), device)
    save_sampler(catalog.path("point_triggers"), points)
    save_grid(catalog.path("baseline_grid"), points.triggers, nrow=min(b.starts, 10))
    del model
    metrics = repair_with(params, device, run, points, "baseline_repaired", "baseline_curve",
                          b.repair_epochs, "point")
    return {"triggers": b.starts, **metrics}
