"""Task of the `baseline` stage: the single-point baseline of the paper (Sec. 5.2).

K triggers optimised in pixel space from random starts (mesa_lib.baselines.fit_point), then the
backdoored model repaired against them exactly like MESA's repair (same `repair.*` settings,
`baseline.repair_epochs` epochs).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task

from mesa_lib.baselines import PointConfig, fit_point
from mesa_lib.modelio import load_model
from tasks import catalog
from tasks.config import Params
from tasks.io import load_npz, save_grid, save_sampler, seeded_subset
from tasks.repair import repair_with
from tasks.tracking import StageRun


@task
def point_baseline(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Optimise the point triggers, save them, repair against them; return metrics."""
    b = params.baseline
    model, _ = load_model(catalog.path("backdoored"), map_location=device)
    images = load_npz(catalog.path("dataset"))["defender_images"]
    images = images[seeded_subset(b.n_images, len(images), params.base.seed)]
    config = PointConfig(starts=b.starts, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr,
                         momentum=b.momentum, seed=params.base.seed)
    points = fit_point(model, images, params.poison.target, (3, 3, 3), config, device)
    save_sampler(catalog.path("point_triggers"), points)
    save_grid(catalog.path("baseline_grid"), points.triggers, nrow=min(b.starts, 10))
    del model
    metrics = repair_with(params, device, run, points, "baseline_repaired", "baseline_curve",
                          b.repair_epochs, "point")
    return {"triggers": b.starts, **metrics}
