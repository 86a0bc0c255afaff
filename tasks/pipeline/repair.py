"""Task of the `repair` stage (and the repair half of `baseline`): fine-tune against samplers.

MESA, Sec. 4.3: the model is fine-tuned on the defender's images, a share of each batch stamped
with triggers drawn from the recovered distribution, labels kept TRUE (mesa_lib.repair).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from prefect import task

from mesa_lib.distribution import TriggerSampler
from mesa_lib.evaluate import accuracy
from mesa_lib.modelio import load_model, save_model
from mesa_lib.repair import repair
from tasks.common import catalog
from tasks.common.configs import repair_config
from tasks.common.io import CsvLog, load_npz
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.samplers import load_sampler
from tasks.pipeline.train import epoch_sink


def repair_with(params: Params, device: torch.device, run: StageRun, sampler: TriggerSampler,
                out: str, curve: str, epochs: int, method: str) -> dict[str, Any]:
    """Repair a copy of the backdoored model with `sampler`; save it as catalog model `out`."""
    model, manifest = load_model(catalog.path("backdoored"), map_location=device)
    data = load_npz(catalog.path("dataset"))
    repair(model, data["defender_images"], data["defender_labels"], sampler,
           repair_config(params, epochs), device,
           epoch_sink(run, f"repair_{method}", CsvLog(catalog.path(curve))))
    manifest = replace(manifest, extra={**manifest.extra, "repair": method,
                                        "repair_epochs": epochs})
    save_model(model, catalog.path(out), manifest)
    # ASR needs the attacker's trigger, which the defender never sees: the evaluate stage.
    return {"clean_accuracy": accuracy(model, data["heldout_images"], data["heldout_labels"],
                                       device)}


@task
def repair_mesa(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Repair the backdoored model with triggers sampled from the MESA distribution."""
    sampler = load_sampler(catalog.path("distribution"), device)
    return repair_with(params, device, run, sampler, "repaired", "repair_curve",
                       params.repair.epochs, "mesa")
