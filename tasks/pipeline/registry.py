"""Model Registry tasks of the pipeline: register a stage's model with its lineage tags, write the
evaluate stage's scan verdicts onto the versions (I/O, retried). The tag format of a verdict is
tasks.common.verdicts, shared with the scan service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from mesa_lib.modelio import model_fingerprint
from tasks.common import catalog, tracking
from tasks.common.dvcgraph import data_md5
from tasks.common.params import Params
from tasks.common.tracking import StageRun
from tasks.common.verdicts import verdict_tags

# Which params groups shaped each registered model (its params hash covers exactly these).
LINEAGE_GROUPS = {
    "backdoored": ("base", "data", "poison", "train"),
    "repaired": ("base", "data", "poison", "train", "recover", "repair"),
    "baseline_repaired": ("base", "data", "poison", "train", "baseline"),
}
REGISTERED_NAMES = {"backdoored": tracking.BACKDOORED, "repaired": tracking.REPAIRED,
                    "baseline_repaired": tracking.BASELINE_REPAIRED}


def parent_version(uri: str | None = None) -> str:
    """'mesa-backdoored/<version>' of the current backdoored model, or 'unregistered:<sha>'."""
    sha = model_fingerprint(catalog.path("backdoored"))
    version = tracking.find_model_version(tracking.BACKDOORED, sha, uri)
    return f"{tracking.BACKDOORED}/{version}" if version else f"unregistered:{sha[:12]}"


@task(retries=2, retry_delay_seconds=2)
def register(run: StageRun, params: Params, artifact: str, description: str) -> str:
    """Register catalog model `artifact`; returns '<registered name>/<version>'."""
    stem: Path = catalog.path(artifact)
    name = REGISTERED_NAMES[artifact]
    tags = {
        "parent_model_version": "none" if artifact == "backdoored" else parent_version(run.uri),
        "data_hash": data_md5(),
        "params_hash": params.digest(*LINEAGE_GROUPS[artifact]),
        "model_sha256": model_fingerprint(stem),
        "scan_verdict": "not scanned",
        "pipeline_run_id": run.parent_id,
        "stage_run_id": run.run_id,
        "attack": f"{params.poison.attack} "
                  f"{params.poison.settings[params.poison.attack].get('trigger', '')} -> "
                  f"{params.poison.target}",
    }
    version = tracking.register_model(run, catalog.get(artifact).files(), name, tags, description)
    tracking.set_tags(run, {"registered_model": f"{name}/{version}"})
    return f"{name}/{version}"


@task(retries=2, retry_delay_seconds=2)
def tag_verdicts(verdicts: dict[str, dict[str, Any]], registered: dict[str, str],
                 run: StageRun) -> dict[str, str]:
    """Write each verdict {label: {status, ..., model_sha256}} onto the version of
    `registered[label]` holding those exact weights; returns {label: 'name/version'}."""
    tagged = {}
    for label, v in verdicts.items():
        version = tracking.find_model_version(registered[label], v["model_sha256"])
        if version:
            tracking.tag_model_version(registered[label], version, verdict_tags(v, run.run_id))
            tagged[label] = f"{registered[label]}/{version}"
    return tagged
