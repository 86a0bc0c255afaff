"""Task of the `repair` stage (and the repair half of `baseline`): the scan service's repair.

MESA, Sec. 4.3: the model is fine-tuned on the repair part of the defender's images, a share of
each batch stamped with triggers drawn from the recovered distributions (one per flagged target,
each placed by its geometry), labels kept TRUE; then verified on the verification part exactly
as the scan service verifies a repair (tasks.scan.defend.repair_prepared): each recovered
trigger's residual ASR, the accuracy change and a re-scan, recorded in `<stage>/verification.json`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from prefect import task
from torch import Tensor, nn

from mesa_lib.evaluate import accuracy
from mesa_lib.geometry import Family, Placed, Recovered
from mesa_lib.modelio import load_model, save_model
from tasks.common import catalog
from tasks.common.io import CsvLog, load_npz, write_json
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.pipeline.defence import calibration_of, defender_reference, recovered_again, target_stem
from tasks.pipeline.samplers import load_sampler
from tasks.pipeline.train import epoch_sink
from tasks.scan.defend import repair_prepared

# (model, repair images uint8 (N, C, H, W), one flagged target's recovery) -> what is stamped
FitFamily = Callable[[nn.Module, Tensor, Recovered], Family]


def repair_with(params: Params, device: torch.device, run: StageRun, fit: FitFamily,
                out: str, curve: str, verification: str, method: str) -> dict[str, Any]:
    """Repair a copy of the backdoored model against `fit`'s triggers for every flagged target,
    verify it, and save it as catalog model `out` (unchanged if the scan flagged nothing)."""
    # `fit` gives the triggers; the config's method would only choose them (and `finetune`
    # would drop them), so it is pinned to a method that stamps what it is given; and to one
    # round: later rounds' triggers would be recovered here, outside the recover stage.
    params = params.model_copy(update={"repair": params.repair.model_copy(
        update={"method": "mesa", "rounds": 1})})
    model, manifest = load_model(catalog.path("backdoored"), map_location=device)
    data = load_npz(catalog.path("dataset"))
    ref = defender_reference(data)
    ready = recovered_again(model, ref, params, device)
    if ready is None:
        record: dict[str, Any] = {"verdict": "not repaired", "method": method,
                                  "reason": "the scan found no backdoor to repair"}
        catalog.path(curve).parent.mkdir(parents=True, exist_ok=True)
        catalog.path(curve).write_text("", encoding="utf-8")
    else:
        families = [fit(model, ref.images[ready.splits.repair], r) for r in ready.found]
        done = repair_prepared(model, ref, ready, params, calibration_of(params), device,
                               families, epoch_sink(run, f"repair_{method}",
                                                    CsvLog(catalog.path(curve))))
        # the families were fitted here, so the method is ours to name, not the config's
        record = done.outcome.record()
        settings = {k: v for k, v in record["settings"].items()
                    if method == "mesa" or k not in ("mesa", "mesa_images")}
        record |= {"method": method, "settings": {**settings, "method": method}}
    write_json(catalog.path(verification), record)
    manifest = replace(manifest, extra={**manifest.extra, "repair": method,
                                        "repair_epochs": params.repair.epochs,
                                        "repair_verification": record["verdict"]})
    save_model(model, catalog.path(out), manifest)
    # ASR needs the attacker's trigger, which the defender never sees: the evaluate stage.
    return {"clean_accuracy": accuracy(model, data["heldout_images"], data["heldout_labels"],
                                       device),
            "verification": {"passed": int(record["verdict"] == "clean"),
                             **{f"asr_after_target_{t['target']}": t["asr_after"]
                                for t in record.get("targets", [])}}}


@task
def repair_mesa(params: Params, device: torch.device, run: StageRun) -> dict[str, Any]:
    """Repair the backdoored model with triggers sampled from the MESA distributions."""
    def fit(_: nn.Module, __: Tensor, found: Recovered) -> Family:
        return Placed(load_sampler(target_stem("recovered", found.target), device),
                      found.geometry)

    return repair_with(params, device, run, fit, "repaired", "repair_curve",
                       "repair_verification", "mesa")
