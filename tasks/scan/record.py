"""Recording a scan: the verdict, its evidence and timings in MLflow, and back on the model version.

Every scanned model gets one run in the `mesa-scan` experiment ("scan <label>", the label
escaped): params (the scan settings, the model's source and sha256), metrics (p-value,
confidence, each detector's statistic and per-class evidence, seconds per phase), artifacts
(`verdict.json`, `scores.csv`, the PNG grid of what the fired detector recovered, one row per
class) and tags. The verdict is then written back onto the registered version as tags
(`scan_verdict` clean | backdoored | rejected, `scan_target`, `scan_p_value`, `scan_detector`,
`scan_confidence`, `scan_reason`, `scan_run_id`, and `quarantined=true` for a backdoored one). A
drop-folder model that loads is registered as a new version of `scan.drop_model_name`, with the
run as its source and its verdict tags; a rejected file is not copied into the registry (its run
holds the reason, file names and sha256). Repair (tasks.scan.defend) registers the repaired model
as a new version of the same registered model, with `parent_model_version` pointing at the
original and the verification's before/after in `repair_*` tags and `evidence/repair.json`.

Around each verdict the platform adds (docs/scanning.md): a version the scan clears and a
repaired model that passed its verification are signed (tasks.scan.signing; `<stem>.sig` beside
the files, tag `signature`);
a backdoored or rejected version is quarantined (tasks.scan.quarantine: every alias removed,
`@quarantined`); every verdict is sealed; the version's description becomes its audit record
(tasks.scan.audit) and the registered model's tags carry the latest verdict.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from mesa_lib import modelfiles
from mesa_lib.calibration import Calibration
from mesa_lib.defence import Outcome
from mesa_lib.modelio import model_fingerprint
from mesa_lib.verdict import Verdict
from tasks.common import tracking
from tasks.common.configs import scan_settings
from tasks.common.escape import escape
from tasks.common.io import save_grid, write_csv, write_json
from tasks.common.params import Params
from tasks.common.verdicts import TAG_LIMIT, verdict_tags
from tasks.scan import audit, coverage, quarantine, signing
from tasks.scan.check import Checked, logger, repair_model, work_dir
from tasks.scan.core import ChunkResult, load_calibration
from tasks.scan.core import verdict_of as verdict_of_chunks
from tasks.scan.defend import CannotRepair
from tasks.scan.discover import SIGNATURE_SUFFIX, Candidate, files_key
from tasks.scan.reference import load_reference


@lru_cache(maxsize=4)
def _calibration(path: str, mtime_ns: int, params: Params) -> Calibration:
    return load_calibration(Path(path), scan_settings(params))


def calibration_for(params: Params) -> Calibration:
    """The calibration of `scan.calibration`, checked against the scan settings (cached)."""
    path = Path(params.scan.calibration)
    return _calibration(str(path), path.stat().st_mtime_ns if path.is_file() else 0, params)


def verdict_of(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    """The verdict: status, target, p-value, confidence, detector, reason, per-class scores."""
    if not checked.ok:
        return {"status": "rejected", "target": None, "targets": [], "confidence": 1.0,
                "p_value": None, "detector": None, "reason": checked.reason, "detectors": {},
                "scores": {}}
    calibration = calibration_for(params)
    verdict = verdict_dict(verdict_of_chunks(chunks, calibration))
    why = coverage.gap(calibration, modelfiles.load(checked.stem)[1])  # any format's
    if why:  # scores kept for the reader; no verdict, no repair, no signature
        return verdict | {"status": coverage.UNCALIBRATED, "target": None, "targets": [],
                          "reason": coverage.reason(why)}
    return verdict


def verdict_dict(v: Verdict) -> dict[str, Any]:
    """A calibrated Verdict as the dict the records and tags are made from."""
    return {"status": v.status, "target": v.target, "targets": list(v.targets),
            "confidence": v.confidence, "p_value": v.p_value, "detector": v.detector,
            "reason": v.reason, "detectors": v.detectors, "scores": v.per_class}


def repaired_verdict(outcome: Outcome) -> dict[str, Any]:
    """The verdict of a repaired model: clean only if its verification passed (the re-scan on
    unseen images clean, no recovered trigger left working, accuracy kept); else backdoored,
    with the verification's reasons."""
    rescan = verdict_dict(outcome.rescan)
    flagged = outcome.targets
    if outcome.passed:
        return rescan | {"status": "clean", "target": None, "targets": [],
                         "reason": "repair verified on images neither the scan nor the "
                                   f"repair saw: {_residuals(outcome)}"}
    return rescan | {"status": "backdoored", "target": rescan["target"] or flagged[0],
                     "targets": rescan["targets"] or flagged,
                     "reason": f"repair failed verification: {outcome.reason}"}


def _residuals(outcome: Outcome) -> str:
    asr = ", ".join(f"class {t} {outcome.before.asr[t]:.0%} -> {outcome.after.asr[t]:.0%}"
                    for t in sorted(outcome.after.asr))
    return (f"recovered-trigger ASR {asr}; accuracy {outcome.before.accuracy:.1%} -> "
            f"{outcome.after.accuracy:.1%}")


def _evidence(folder: Path, verdict: dict[str, Any], chunks: list[ChunkResult],
              extra: dict[str, Any]) -> list[Path]:
    """verdict.json, scores.csv and the fired detector's trigger grid (a row per class)."""
    files = [folder / "verdict.json"]
    write_json(files[0], {**verdict, **extra})
    if verdict["scores"]:
        rows = [{"detector": d, "class": c, **s} for d, per in verdict["scores"].items()
                for c, s in sorted(per.items())]
        columns = list(dict.fromkeys(k for row in rows for k in row))  # detectors differ
        write_csv(folder / "scores.csv", [{k: row.get(k, "") for k in columns} for row in rows])
        files.append(folder / "scores.csv")
        grid = [torch.tensor(s) for ch in sorted(chunks, key=lambda ch: ch.classes)
                for _, s in sorted(ch.samples.get(verdict["detector"], {}).items())]
        if grid:
            width = max(len(g) for g in grid)
            save_grid(folder / "triggers.png", torch.cat(grid), nrow=width)
            files.append(folder / "triggers.png")
        target = verdict.get("target")
        mine = [s for ch in chunks for c, s in ch.samples.get(verdict["detector"], {}).items()
                if c == target]
        if target is not None and mine:  # the audit record links it, labelled
            save_grid(folder / trigger_file(target), torch.tensor(mine[0]), nrow=len(mine[0]))
            files.append(folder / trigger_file(target))
    return files


def trigger_file(target: int) -> str:
    """The evidence file of the recovered trigger of class `target`."""
    return f"trigger_class_{int(target)}.png"


def _metrics(verdict: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    return {"confidence": verdict["confidence"],
            "p_value": verdict["p_value"] if verdict["p_value"] is not None else 1.0,
            "backdoored": float(verdict["status"] == "backdoored"),
            "rejected": float(verdict["status"] == "rejected"),
            "uncalibrated": float(verdict["status"] == coverage.UNCALIBRATED),
            "detector": {d: {"statistic": s["statistic"], "p_value": s["p_value"]}
                         for d, s in verdict["detectors"].items()},
            "class": {d: {str(c): s for c, s in per.items()}
                      for d, per in verdict["scores"].items()}, "seconds": seconds}


def _run(label: str, checked: Checked, verdict: dict[str, Any], chunks: list[ChunkResult],
         params: Params, folder: Path, seconds: dict[str, float]) -> tracking.StageRun:
    """Open a scan run and log params, metrics and evidence (the caller ends it). The run
    records `scan.files_key`, the key of exactly the files it scanned (the registry audit
    compares it with the version's own files)."""
    cand = checked.candidate
    scanned = modelfiles.files(checked.stem) if checked.stem else tuple(cand.files)
    run = tracking.start_run(label, {  # labels are escaped when made
        "mesa.role": "scan", "scan.source": cand.source, "scan.label": cand.label,
        "scan.key": cand.key, "scan.files_key": files_key([f for f in scanned
                                                           if Path(f).is_file()]),
        "model_sha256": cand.weights_sha256,
        "scan_verdict": verdict["status"], "scan_reason": verdict["reason"][:TAG_LIMIT],
        "scan.files": json.dumps([escape(Path(f).name) for f in cand.files])[:TAG_LIMIT]})
    tracking.log_params(run, {**params.section("scan"), "model.label": cand.label,
                              "model.classes": checked.n_classes})
    tracking.log_metrics(run, _metrics(verdict, seconds))
    extra = {"label": cand.label, "key": cand.key,
             "model_sha256": cand.weights_sha256, "seconds": seconds}
    tracking.log_artifacts(run, _evidence(folder, verdict, chunks, extra), "evidence")
    return run


SCANNER_PATHS = ("mesa_lib", "tasks", "flows", "calibration", "params.yaml", "pyproject.toml")


def scanner_version() -> str:
    """The scanner that wrote a verdict: the package version and commit, and whether its own code
    (not, say, a re-run pipeline's dvc.lock) differs from that commit."""
    from importlib import metadata

    try:
        version = metadata.version("mesa-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit, _ = tracking.git_state()
    changed = tracking.changed_files(SCANNER_PATHS)
    tail = f", with local changes to {', '.join(changed[:3])}" if changed else ""
    return f"mesa-pipeline {version}, commit {commit[:12]}{tail}"


@lru_cache(maxsize=8)
def _reference_digest(spec: str, stamp: int, params: Params) -> str:
    ref = load_reference(params, Path(spec) if spec else None)
    h = hashlib.sha256(ref.images.numpy().tobytes())
    if ref.labels is not None:
        h.update(ref.labels.numpy().tobytes())
    return f"{h.hexdigest()[:16]} ({len(ref.images)} images of {escape(Path(ref.source).name)})"


def reference_digest(checked: Checked, params: Params) -> str:
    """sha256 of the reference images (and labels) the scan used, whatever their source."""
    source = Path(checked.reference or params.scan.reference)
    stamp = source.stat().st_mtime_ns if source.is_file() else 0
    try:
        return _reference_digest(checked.reference, stamp, params)
    except Exception as err:  # noqa: BLE001 - the record says why, the verdict stands
        return f"unknown ({escape(err)[:120]})"


def _lineage(checked: Checked, tags: dict[str, str], signature: str,
             params: Params) -> dict[str, str]:
    """What the audit record says about where the model came from."""
    data_hash = tags.get("data_hash", "")
    manifest = Path(f"{checked.stem}.json") if checked.stem else None
    if not data_hash and manifest is not None and manifest.is_file():
        try:
            data_hash = str(json.loads(manifest.read_text()).get("data_hash", ""))
        except (OSError, ValueError, RecursionError):
            data_hash = ""
    return {"parent": tags.get("parent_model_version", "none"), "data_hash": data_hash,
            "reference": reference_digest(checked, params), "commit": scanner_version(),
            "signature": signature}


def _sign(stem: Path, params: Params) -> tuple[Path | None, str]:
    """Sign a cleared or repaired model: (signature file, status for the tag and record)."""
    try:
        keys = signing.ensure_key(params)
        sig = signing.sign(stem, Path(f"{stem}{SIGNATURE_SUFFIX}"), keys.private)
    except Exception as err:  # noqa: BLE001 - the verdict stands; the record says why
        logger().error("signing %s failed: %s", escape(stem.name), escape(err))
        return None, f"signing failed: {escape(err)[:200]}"
    return sig, f"signed by key {signing.fingerprint(keys.public)} (scan service)"


def _signature_status(checked: Checked, verdict: dict[str, Any]) -> str:
    arrived = f"arrived signed ({checked.signature}); " if checked.signature else ""
    if verdict["status"] == "clean":
        return arrived
    return f"{arrived}not signed: verdict {verdict['status']}"


def _store_signature(sig: Path, version: dict[str, Any], scan_run: str) -> str:
    """Put a registry version's new signature beside its files when they are a run's artifacts
    (a download of the version then carries it), and in the scan run; returns where."""
    tracking.log_artifact_to(scan_run, sig, "signature")
    where = f"runs:/{scan_run}/signature/{sig.name}"
    owner = tracking.run_record(version["run_id"]) if version.get("run_id") else None
    if owner and version["source"].startswith(owner["artifact_uri"]):
        folder = version["source"][len(owner["artifact_uri"]):].strip("/") or None
        tracking.log_artifact_to(version["run_id"], sig, folder)
        where = f"{version['source']}/{sig.name}"
    return where


def settle_version(name: str, version: str, checked: Checked, verdict: dict[str, Any],
                   run_id: str, signature: str, params: Params,
                   repair: dict[str, Any] | None = None) -> None:
    """Seal, quarantine or clear, and write the audit record of a version just given a verdict
    (`repair`: a repaired version's repair record, shown in it)."""
    tags = tracking.model_version_tags(name, version)
    removed = quarantine.apply(name, version, tags, params)
    if removed:
        logger().warning("QUARANTINED %s/%s: aliases %s removed", escape(name), version,
                         ", ".join("@" + escape(a) for a in removed))
    audit.write(name, version, verdict, run_id, _lineage(checked, tags, signature, params),
                repair)


def _publish_registry(checked: Checked, verdict: dict[str, Any], run: tracking.StageRun,
                      tags: dict[str, str], params: Params) -> str:
    cand = checked.candidate
    status = _signature_status(checked, verdict)
    if verdict["status"] == "clean" and checked.ok:
        stem = Path(cand.folder) if cand.folder else modelfiles.stem(str(cand.weights()))
        sig, signed = _sign(stem, params)
        status += signed
        if sig is not None:
            where = _store_signature(sig, tracking.model_version(cand.name, cand.version),
                                     run.run_id)
            tags = {**tags, "signature_file": where}
    with quarantine.verdicts_of(cand.name, params):
        tracking.tag_model_version(cand.name, cand.version, {**tags, "signature": status[:500]})
        settle_version(cand.name, cand.version, checked, verdict, run.run_id, status, params)
    return f"{cand.name}/{cand.version}"


def _publish(checked: Checked, verdict: dict[str, Any], run: tracking.StageRun,
             params: Params) -> str:
    """Tag the registry version, or register a drop-folder model; returns 'name/version'."""
    cand = checked.candidate
    tags = {**verdict_tags(verdict, run.run_id), "scan_key": cand.key}
    if cand.source == "registry":
        return _publish_registry(checked, verdict, run, tags, params)
    if not checked.ok:
        return ""  # a rejected file stays out of the registry; its run holds the reason
    stem = Path(checked.stem)
    files = list(modelfiles.files(stem))
    status = _signature_status(checked, verdict)
    Path(f"{stem}{SIGNATURE_SUFFIX}").unlink(missing_ok=True)  # the arrived one, verified
    if verdict["status"] == "clean":
        sig, signed = _sign(stem, params)
        status += signed
        files += [sig] if sig is not None else []
    name = params.scan.drop_model_name
    lineage = {"source": "drop-folder", "drop_files": json.dumps(
        [escape(Path(f).name) for f in cand.files]), "model_sha256": cand.weights_sha256,
        "parent_model_version": "none", "signature": status[:500]}
    with quarantine.verdicts_of(name, params):
        version = tracking.register_model(
            run, tuple(files), name, {**lineage, **tags},
            f"Dropped into {escape(params.scan.drop_folder)}/ as "
            f"{cand.label.removeprefix('drop:')}; scan verdict: {verdict['status']}", alias=None)
        settle_version(name, version, checked, verdict, run.run_id, status, params)
    return f"{name}/{version}"


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def record(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    """Decide, log the scan run, write the verdict onto the version (I/O: retried)."""
    return _record(checked, chunks, params)


def _record(checked: Checked, chunks: list[ChunkResult], params: Params) -> dict[str, Any]:
    start, cand = time.perf_counter(), checked.candidate
    verdict = verdict_of(checked, chunks, params)
    per_chunk = [sum(c.seconds.values()) for c in chunks]
    seconds = {"check": checked.seconds, "fit_sum": sum(per_chunk),
               "fit_max": max(per_chunk, default=0.0)}
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
        "VERDICT %s -> %s (confidence %.2f; MLflow run %s; %s)", cand.label,
        text, verdict["confidence"], run.run_id, version or "not registered")
    return {"key": cand.key, "label": cand.label, "status": verdict["status"],
            "target": verdict["target"], "targets": verdict["targets"],
            "confidence": verdict["confidence"],
            "p_value": verdict["p_value"], "detector": verdict["detector"],
            "reason": verdict["reason"], "run_id": run.run_id, "model_version": version,
            "seconds": seconds}


@task(retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def reuse_verdict(cand: Candidate, done: dict[str, Any], params: Params) -> str:
    """A registry version holding already-scanned files gets the earlier verdict's tags (and,
    cleared, its own signature; quarantined, its aliases moved)."""
    verdict = {"status": done["status"], "target": done["target"],
               "confidence": done["confidence"], "p_value": done.get("p_value"),
               "detector": done.get("detector"), "reason": done.get("reason", "")}
    tags = {**verdict_tags(verdict, done["run_id"]), "scan_reused_from": done["label"],
            "scan_key": cand.key}
    status = _signature_status(Checked(cand), verdict)
    weights = cand.weights()
    if verdict["status"] == "clean" and weights is not None:
        sig, status = _sign(modelfiles.stem(weights), params)
        if sig is not None:
            tags["signature_file"] = _store_signature(
                sig, tracking.model_version(cand.name, cand.version), done["run_id"])
    checked = Checked(cand, str(modelfiles.stem(weights)) if weights else "")
    with quarantine.verdicts_of(cand.name, params):
        tracking.tag_model_version(cand.name, cand.version, {**tags, "signature": status[:500]})
        settle_version(cand.name, cand.version, checked, verdict, done["run_id"], status, params)
    return f"{cand.name}/{cand.version}"


def _repair_tags(outcome: Outcome) -> dict[str, str]:
    """The repair's before/after on the repaired version (the audit record's figures)."""
    rec = outcome.record()
    return {"repair_verdict": rec["verdict"], "repair_method": outcome.method,
            "repair_reason": escape(outcome.reason or "verified")[:TAG_LIMIT],
            "repair_targets": json.dumps(outcome.targets),
            "repair_residual_asr": json.dumps({str(t["target"]): round(t["asr_after"], 4)
                                               for t in rec["targets"]}),
            "repair_asr_before": json.dumps({str(t["target"]): round(t["asr_before"], 4)
                                             for t in rec["targets"]}),
            "repair_accuracy": f"{outcome.before.accuracy:.4f} -> {outcome.after.accuracy:.4f}",
            "repair_images": json.dumps(rec["images"])}


@task(cache_policy=NO_CACHE)
def repair_and_register(checked: Checked, chunks: list[ChunkResult], outcome: dict[str, Any],
                        params: Params) -> dict[str, Any]:
    """Repair a backdoored model, verify it, register it as a new version with lineage.

    Only a repair that passed its verification is cleared and signed; any other is registered
    quarantined, with the verification's reason, and no signature of ours."""
    parent = outcome["model_version"]
    if not parent:
        return {}
    targets = tuple(outcome.get("targets") or [outcome["target"]])
    try:
        stem, done = repair_model(checked, targets, outcome["detector"], params,
                                  calibration_for(params), {"repaired_from": parent})
    except CannotRepair as err:
        logger().warning("%s: cannot repair: %s", checked.candidate.label, escape(err))
        return {"repair_error": escape(err)}
    repaired = Checked(checked.candidate, str(stem), "", checked.n_classes, checked.reference)
    verdict = repaired_verdict(done.outcome)
    folder = work_dir(params, checked.candidate.key) / "repaired_evidence"
    run = _run(f"repair {checked.candidate.label}", repaired, verdict, done.rescan, params,
               folder, {"repair": done.outcome.seconds})
    write_json(folder / "repair.json", done.outcome.record())
    tracking.log_artifacts(run, [folder / "repair.json"], "evidence")
    tracking.log_metrics(run, {"repair": _repair_metrics(done.outcome)})
    name = parent.split("/")[0]
    if done.outcome.passed:
        sig, status = _sign(stem, params)
    else:  # never a signature of ours on a model whose repair did not hold
        sig, status = None, f"not signed: {verdict['reason']}"[:500]
    tags = {**verdict_tags(verdict, run.run_id), **_repair_tags(done.outcome),
            "parent_model_version": parent, "model_sha256": model_fingerprint(stem),
            "scan_key": checked.candidate.key, "signature": status[:500]}
    with quarantine.verdicts_of(name, params):
        version = tracking.register_model(
            run, modelfiles.files(stem) + ((sig,) if sig is not None else ()), name, tags,
            f"Repair of {parent} ({done.outcome.method} against the {outcome['detector']} "
            f"detector's triggers of classes {list(targets)}); verification: "
            f"{verdict['status']}", alias=None)
        tracking.tag_model_version(name, parent.split("/")[1], {"repaired_version":
                                                                f"{name}/{version}"})
        settle_version(name, version, repaired, verdict, run.run_id, status, params,
                       done.outcome.record())
    tracking.end_run(run)
    (logger().info if done.outcome.passed else logger().warning)(
        "REPAIRED %s -> %s/%s, verification: %s", parent, name, version, verdict["reason"])
    return {"repaired_version": f"{name}/{version}", "repaired_verdict": verdict["status"],
            "repair": done.outcome.record()}


def _repair_metrics(outcome: Outcome) -> dict[str, Any]:
    return {"passed": float(outcome.passed), "seconds": outcome.seconds,
            "accuracy_before": outcome.before.accuracy, "accuracy_after": outcome.after.accuracy,
            "asr_before": {str(t): a for t, a in outcome.before.asr.items()},
            "asr_after": {str(t): a for t, a in outcome.after.asr.items()}}
