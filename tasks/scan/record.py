"""Recording a scan: the verdict, its evidence and timings in MLflow, and back on the model version.

Every scanned model gets one run in the `mesa-scan` experiment ("scan <label>"): params (the
scan settings, the model's source and sha256), metrics (confidence, per-class ASR / anomaly /
margin / entropy / breadth, seconds per phase), artifacts (`verdict.json`, `scores.csv`, the PNG
grid of recovered trigger samples, one row per class) and tags. The verdict is then written back
onto the registered version as tags (`scan_verdict` clean | backdoored | rejected, `scan_target`,
`scan_confidence`, `scan_reason`, `scan_run_id`, and `quarantined=true` for a backdoored one). A
drop-folder model that loads is registered as a new version of `scan.drop_model_name`, with the
run as its source and its verdict tags; a rejected file is not copied into the registry (its run
holds the reason, file names and sha256). Repair registers the repaired model as a new version
of the same registered model, with `parent_model_version` pointing at the original.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from mesa_lib.detect import decide
from mesa_lib.modelio import model_fingerprint
from tasks.common import tracking
from tasks.common.configs import scan_config
from tasks.common.io import save_grid, write_csv, write_json
from tasks.common.params import Params
from tasks.common.verdicts import TAG_LIMIT, verdict_tags
from tasks.scan.check import Checked, ChunkResult, logger, repair_model, work_dir


def verdict_of(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    """The verdict record: status, target, confidence, reason, per-class scores."""
    if not checked.ok:
        return {"status": "rejected", "target": None, "confidence": 1.0,
                "reason": checked.reason, "scores": {}}
    verdict = decide({c: s for ch in chunks for c, s in ch.scores.items()},
                     scan_config(params, checked.n_classes))
    return {"status": verdict.status, "target": verdict.target,
            "confidence": verdict.confidence, "reason": verdict.reason, "scores": verdict.scores}


def _evidence(folder: Path, verdict: dict[str, Any], chunks: list[ChunkResult],
              extra: dict[str, Any]) -> list[Path]:
    """verdict.json, scores.csv and the trigger grid (one row per class) in `folder`."""
    files = [folder / "verdict.json"]
    write_json(files[0], {**verdict, **extra})
    if verdict["scores"]:
        rows = [{"class": c, **s} for c, s in sorted(verdict["scores"].items())]
        write_csv(folder / "scores.csv", rows)
        samples = [torch.tensor(s) for ch in sorted(chunks, key=lambda ch: ch.classes)
                   for _, s in sorted(ch.samples.items())]
        save_grid(folder / "triggers.png", torch.cat(samples), nrow=len(samples[0]))
        files += [folder / "scores.csv", folder / "triggers.png"]
    return files


def _metrics(verdict: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    return {"confidence": verdict["confidence"],
            "backdoored": float(verdict["status"] == "backdoored"),
            "rejected": float(verdict["status"] == "rejected"),
            "class": {str(c): s for c, s in verdict["scores"].items()}, "seconds": seconds}


def _run(label: str, checked: Checked, verdict: dict[str, Any], chunks: list[ChunkResult],
         params: Params, folder: Path, seconds: dict[str, float]) -> tracking.StageRun:
    """Open a scan run and log params, metrics and evidence (the caller ends it)."""
    cand = checked.candidate
    run = tracking.start_run(label, {
        "mesa.role": "scan", "scan.source": cand.source, "scan.label": cand.label,
        "scan.key": cand.key, "model_sha256": cand.weights_sha256,
        "scan_verdict": verdict["status"], "scan_reason": verdict["reason"][:TAG_LIMIT],
        "scan.files": json.dumps([Path(f).name for f in cand.files])[:TAG_LIMIT]})
    tracking.log_params(run, {**params.section("scan"), "model.label": cand.label,
                              "model.classes": checked.n_classes})
    tracking.log_metrics(run, _metrics(verdict, seconds))
    extra = {"label": cand.label, "key": cand.key, "model_sha256": cand.weights_sha256,
             "seconds": seconds}
    tracking.log_artifacts(run, _evidence(folder, verdict, chunks, extra), "evidence")
    return run


def _publish(checked: Checked, verdict: dict[str, Any], run: tracking.StageRun,
             params: Params) -> str:
    """Tag the registry version, or register a drop-folder model; returns 'name/version'."""
    cand = checked.candidate
    tags = verdict_tags(verdict, run.run_id)
    if cand.source == "registry":
        tracking.tag_model_version(cand.name, cand.version, tags)
        return f"{cand.name}/{cand.version}"
    if not checked.ok:
        return ""  # a rejected file stays out of the registry; its run holds the reason
    stem = Path(checked.stem)
    files = (stem.with_suffix(".safetensors"), stem.with_suffix(".json"))
    name = params.scan.drop_model_name
    lineage = {"source": "drop-folder", "drop_files": json.dumps(
        [Path(f).name for f in cand.files]), "model_sha256": cand.weights_sha256,
        "scan_key": cand.key, "parent_model_version": "none"}
    version = tracking.register_model(
        run, files, name, {**lineage, **tags},
        f"Dropped into {params.scan.drop_folder}/ as {cand.label.removeprefix('drop:')}; "
        f"scan verdict: {verdict['status']}", alias=None)
    return f"{name}/{version}"


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def record(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    """Decide, log the scan run, write the verdict onto the version (I/O: retried)."""
    return _record(checked, chunks, params)


def _record(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    start, cand = time.perf_counter(), checked.candidate
    verdict = verdict_of(checked, chunks, params)
    seconds = {"check": checked.seconds, "fit_sum": sum(c.seconds for c in chunks),
               "fit_max": max((c.seconds for c in chunks), default=0.0)}
    folder = work_dir(params, cand.key) / "evidence"
    run = _run(f"scan {cand.label}", checked, verdict, chunks, params, folder, seconds)
    try:
        version = _publish(checked, verdict, run, params)
        seconds["record"] = time.perf_counter() - start
        tracking.log_metrics(run, {"seconds": {"record": seconds["record"]}})
        tracking.set_tags(run, {"model_version": version or "not registered"})
        tracking.end_run(run)
    except BaseException:
        try:
            tracking.end_run(run, "FAILED")
        except Exception:  # the server may be the reason we are here
            pass
        raise
    log = logger()
    text = verdict["status"] + (f", target {verdict['target']}" if verdict["target"] is not None
                                else "") + (f": {verdict['reason']}" if verdict["reason"] else "")
    (log.warning if verdict["status"] != "clean" else log.info)(
        "VERDICT %s -> %s (confidence %.2f; MLflow run %s; %s)", cand.label, text,
        verdict["confidence"], run.run_id, version or "not registered")
    return {"key": cand.key, "label": cand.label, "status": verdict["status"],
            "target": verdict["target"], "confidence": verdict["confidence"],
            "reason": verdict["reason"], "run_id": run.run_id, "model_version": version,
            "seconds": seconds}


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def reuse_verdict(version: dict[str, str], done: dict[str, Any]) -> str:
    """A registry version holding already-scanned files gets the earlier verdict's tags."""
    verdict = {"status": done["status"], "target": done["target"],
               "confidence": done["confidence"], "reason": done.get("reason", "")}
    tags = {**verdict_tags(verdict, done["run_id"]), "scan_reused_from": done["label"]}
    tracking.tag_model_version(version["name"], version["version"], tags)
    return f"{version['name']}/{version['version']}"


@task(cache_policy=NO_CACHE)
def repair_and_register(checked: Checked, chunks: list[ChunkResult], outcome: dict[str, Any],
                        params: Params) -> dict[str, Any]:
    """Repair a backdoored model, re-scan it, register it as a new version with lineage."""
    parent = outcome["model_version"]
    done = repair_model(checked, chunks, outcome["target"], params, {"repaired_from": parent})
    if done is None or not parent:
        return {}
    stem, rescan = done
    repaired = Checked(checked.candidate, str(stem), "", checked.n_classes, checked.reference)
    verdict = verdict_of(repaired, rescan, params)
    folder = work_dir(params, checked.candidate.key) / "repaired_evidence"
    run = _run(f"repair {checked.candidate.label}", repaired, verdict, rescan, params, folder,
               {"fit_sum": rescan[0].seconds})
    name = parent.split("/")[0]
    tags = {**verdict_tags(verdict, run.run_id), "parent_model_version": parent,
            "repair": "mesa", "model_sha256": model_fingerprint(stem)}
    version = tracking.register_model(
        run, (stem.with_suffix(".safetensors"), stem.with_suffix(".json")), name, tags,
        f"MESA repair of {parent}; re-scan verdict: {verdict['status']}", alias=None)
    tracking.tag_model_version(name, parent.split("/")[1], {"repaired_version":
                                                            f"{name}/{version}"})
    tracking.end_run(run)
    logger().info("REPAIRED %s -> %s/%s, re-scan: %s", parent, name, version, verdict["status"])
    return {"repaired_version": f"{name}/{version}", "repaired_verdict": verdict["status"]}
