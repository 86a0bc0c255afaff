"""Task of the `baseline` stage: the single-point baseline of the paper (Sec. 5.2).

K triggers optimised in pixel space from random starts (mesa_lib.baselines.fit_point) for each
flagged target, in its recovered geometry, then the backdoored model repaired and verified
against them exactly like MESA's repair (same `repair.*` settings, `baseline.repair_epochs`
epochs).
"""

from __future__ import annotations

from typing import Any

import torch
from prefect import task
from torch import Tensor, nn

from mesa_lib.baselines import fit_point
from mesa_lib.data import seeded_subset
from mesa_lib.geometry import Family, Placed, Recovered
from mesa_lib.seed import derive_seed
from tasks.common.configs import point_config
from tasks.common.io import save_grid, write_json
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.defence import fresh_folder, target_stem
from tasks.pipeline.repair import repair_with
from tasks.pipeline.samplers import save_sampler


@task
def point_baseline(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Optimise the point triggers of every flagged target, save them, repair against them."""
    b = params.baseline
    folder, targets = fresh_folder("point_triggers"), []

    def fit(model: nn.Module, images: Tensor, found: Recovered) -> Family:
        pick = seeded_subset(b.n_images, len(images), derive_seed(params.base.seed, "fit_subset"))
        shape = found.geometry.trigger_shape(images.shape[1])
        points = fit_point(model, images[pick], found.target, shape, point_config(params),
                           device)
        stem = target_stem("point_triggers", found.target)
        save_sampler(stem, points)
        save_grid(stem.with_suffix(".png"), points.triggers, nrow=min(b.starts, 10))
        targets.append(found.target)
        return Placed(points, found.geometry)

    repair = params.repair.model_copy(update={"epochs": b.repair_epochs})
    metrics = repair_with(params.model_copy(update={"repair": repair}), device, run, fit,
                          "baseline_repaired", "baseline_curve", "baseline_verification",
                          "point")
    write_json(folder / "triggers.json", {"targets": targets, "starts": b.starts})
    return {"triggers": b.starts * len(targets), **metrics}
