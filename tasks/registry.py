"""Model Registry tasks: register a stage's model with its lineage tags, write scan verdicts onto
versions (I/O, retried). `verdict_tags` is the one tag format of a verdict, used by the evaluate
stage and by the scan service alike."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task

from mesa_lib.modelio import model_fingerprint
from tasks import catalog, dag, tracking
from tasks.config import Params
from tasks.tracking import StageRun

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
        "data_hash": dag.data_md5(),
        "params_hash": params.digest(*LINEAGE_GROUPS[artifact]),
        "model_sha256": model_fingerprint(stem),
        "scan_verdict": "not scanned",
        "pipeline_run_id": run.parent_id,
        "stage_run_id": run.run_id,
        "attack": f"{params.poison.attack} {params.poison.trigger} -> {params.poison.target}",
    }
    version = tracking.register_model(run, catalog.get(artifact).files(), name, tags, description)
    tracking.set_tags(run, {"registered_model": f"{name}/{version}"})
    return f"{name}/{version}"


TAG_LIMIT = 4000  # registry tag values are limited in length


def verdict_tags(verdict: dict[str, Any], run_id: str) -> dict[str, str]:
    """The tags a scan verdict {status, target, confidence, reason} puts on a model version.

    `scan_verdict` is clean | backdoored | rejected (or "not scanned" at registration); a
    backdoored model is also tagged `quarantined`.
    """
    tags = {"scan_verdict": verdict["status"],
            "scan_target": "" if verdict["target"] is None else str(verdict["target"]),
            "scan_confidence": f"{verdict['confidence']:.3f}",
            "scan_reason": verdict.get("reason", "")[:TAG_LIMIT],
            "scan_run_id": run_id,
            "scan_time": datetime.now(UTC).isoformat(timespec="seconds")}
    if verdict["status"] == "backdoored":
        tags["quarantined"] = "true"
    return tags


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
