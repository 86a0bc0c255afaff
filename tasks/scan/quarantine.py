"""A quarantine that blocks: aliases, findings and verdicts nobody scanned.

A backdoored or rejected version loses every alias (`@current`, `@champion`, ...: whatever a
consumer loads by) and gets the alias `quarantined` plus the tag `quarantined=true`. MLflow lets
an alias name one version only, so with several quarantined versions of one registered model
`@quarantined` points at the newest and the tag marks each. A clean verdict from a new scan
lifts the quarantine (tag removed, `@quarantined` removed if it pointed there); nothing else does.

`audit` runs at the start of every discovery run over the watched registered models and reports
(flow log, flow result, `<state>/findings.jsonl`) and undoes:
- an alias pointing at a quarantined version (moved there by hand): the alias is removed;
- a verdict no scan wrote: its `scan_run_id` run does not exist, is not in the scan service's
  experiment (which only the service account may write: tasks.scan.auth), recorded another
  verdict, or the service's seal (tasks.common.verdicts.seal) does not match (a tag edited by
  hand), or the run scanned other files (its `scan.files_key` is not, or does not record, the
  key of this version's files). The
  version is quarantined and its verdict reset to `not scanned`, so the same run scans it again
  (or re-applies the verdict recorded for its exact files in the state folder).
A scan writes a version's verdict tags and seal under the model's lock (`verdicts_of`), and
every check reads them under it, so none meets a verdict half written.
Verdicts of the pipeline's `evaluate` stage carry no seal; on a store without accounts
(`platform.auth: false`, one user) they hold when their run is that stage's and its metrics
`scan.<model>.backdoored` / `p_value` match the tags. With accounts anyone may write such a run
(and a publisher may put tags on a version it creates), so only the service's verdicts hold.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks.common import tracking
from tasks.common.escape import escape
from tasks.common.params import Params
from tasks.common.verdicts import QUARANTINE_ALIAS, QUARANTINED, is_quarantined, seal, seal_holds
from tasks.scan.auth import seal_secret
from tasks.scan.check import logger

VERDICTS = ("clean", "backdoored", "rejected", "uncalibrated")
LOCK_WAIT = 120.0  # seconds a check waits for a scan writing verdicts of the same model


@contextmanager
def verdicts_of(name: str, params: Params) -> Iterator[None]:
    """Held by a scan from its first verdict tag on a version of `name` until the seal, and by
    every check of such a verdict (audit, alias and event paths). MLflow sets tags one request
    at a time: a check between them reads a verdict without its seal and calls the service's
    own write a forgery. A lock file in the state folder, which the deployments share (one host,
    or a file system with locks). Raises filelock.Timeout after LOCK_WAIT seconds."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]  # names come from outside
    path = Path(params.scan.state_folder) / "locks" / f"{digest}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, timeout=LOCK_WAIT):
        yield


def quarantine(name: str, version: str) -> list[str]:
    """Take every alias off the version, tag it, give it `@quarantined`; the aliases removed."""
    aliases = tracking.model_aliases(name)
    removed = [a for a, v in aliases.items() if v == version and a != QUARANTINE_ALIAS]
    for alias in removed:
        tracking.delete_alias(name, alias)
    tracking.tag_model_version(name, version, {"quarantined": "true"})
    if aliases.get(QUARANTINE_ALIAS) != version:
        newest = aliases.get(QUARANTINE_ALIAS)
        if newest is None or int(version) >= int(newest):  # @quarantined: the newest of them
            tracking.set_alias(name, QUARANTINE_ALIAS, version)
    return removed


def lift(name: str, version: str) -> None:
    """A new scan cleared the version: remove its quarantine tag and alias."""
    tracking.delete_model_version_tags(name, version, ("quarantined",))
    if tracking.model_aliases(name).get(QUARANTINE_ALIAS) == version:
        tracking.delete_alias(name, QUARANTINE_ALIAS)


HELD_TAG = "scan_held_aliases"


def hold(name: str, version: str) -> list[str]:
    """Scan pending: take every alias off a version about to be scanned (kept in the tag
    `scan_held_aliases`, given back if it is cleared), so no consumer loads an unscanned
    version by alias. Returns the aliases taken."""
    taken = [a for a, v in tracking.model_aliases(name).items()
             if v == version and a != QUARANTINE_ALIAS]
    for alias in taken:
        tracking.delete_alias(name, alias)
    current = tracking.model_version_tags(name, version)
    if not taken and current.get("scan_status") == "pending":
        return []  # held already (every poll meets a version still being scanned)
    tags = {"scan_status": "pending"}
    if taken:
        held = current.get(HELD_TAG, "[]")
        tags[HELD_TAG] = json.dumps(sorted(set(_aliases(held)) | set(taken)))
        logger().info("scan pending for %s/%s: aliases %s held until it is cleared",
                      escape(name), version, ", ".join("@" + escape(a) for a in taken))
    tracking.tag_model_version(name, version, tags)
    return taken


def _aliases(text: str) -> list[str]:
    try:
        found = json.loads(text)
    except ValueError:
        return []
    return [a for a in found if isinstance(a, str)] if isinstance(found, list) else []


def give_back(name: str, version: str, tags: dict[str, str]) -> list[str]:
    """A cleared version gets back the aliases held while it was scanned (those nobody has
    put on another version meanwhile); returns them."""
    taken = tracking.model_aliases(name)
    back = [a for a in _aliases(tags.get(HELD_TAG, "[]")) if a not in taken]
    for alias in back:
        tracking.set_alias(name, alias, version)
    if HELD_TAG in tags:
        tracking.delete_model_version_tags(name, version, (HELD_TAG,))
    return back


def apply(name: str, version: str, tags: dict[str, str], params: Params) -> list[str]:
    """Seal a verdict just written by a scan, quarantine or clear the version; aliases removed
    (a quarantined version keeps no alias, held ones included; a cleared one gets them back)."""
    removed = quarantine(name, version) if tags["scan_verdict"] in QUARANTINED else []
    if tags["scan_verdict"] == "clean":
        lift(name, version)
    # done and sealed before any alias comes back: the alias event path (`guard_alias`) holds
    # an alias on a version still pending or whose verdict is not yet sealed
    tracking.tag_model_version(name, version, {"scan_status": "done"})
    secret = seal_secret(params)
    tracking.tag_model_version(name, version, {"scan_seal": seal(secret, name, version, tags)})
    if tags["scan_verdict"] == "clean":
        give_back(name, version, tags)
    summarise(name)
    return removed


def _evaluate_backs(run: dict[str, Any], tags: dict[str, str]) -> bool:
    """The pipeline's evaluate stage recorded this verdict (it scans several models a run)."""
    if run["tags"].get("mesa.stage") != "evaluate" or tags.get("scan_verdict") == "rejected":
        return False
    flag = float(tags["scan_verdict"] == "backdoored")
    p_value = tags.get("scan_p_value", "")
    for key, value in run["metrics"].items():
        if key.startswith("scan.") and key.endswith(".backdoored") and value == flag:
            recorded = run["metrics"].get(key.removesuffix("backdoored") + "p_value")
            if recorded is not None and p_value and abs(recorded - float(p_value)) < 1e-3:
                return True
    return False


def unbacked(name: str, version: str, tags: dict[str, str], secret: str,
             files_key: Callable[[], str] | None = None, service_experiment: str | None = None,
             pipelines_trusted: bool = True) -> str:
    """Why the version's verdict was not written by a scan of its files ('' if it was).

    Args:
        files_key: the key of the version's own files (tasks.scan.discover.files_key); a scan
            run that recorded another key, or none, did not scan them.
        service_experiment: id of the scan service's experiment (only the service account may
            write runs there: tasks.scan.auth.accounts); a verdict run elsewhere is not a scan
            of the service's. None: not checked.
        pipelines_trusted: accept verdicts of a pipeline's evaluate stage (a single-user store;
            with accounts, anyone may write such a run, so only the service's verdicts hold).
    """
    run_id = tags.get("scan_run_id", "")
    run = tracking.run_record(run_id) if run_id else None
    if run is None:
        return f"its scan_run_id {escape(run_id)!r} names no run"
    recorded = run["tags"].get("scan_verdict")
    if recorded is not None:
        if service_experiment is not None and run["experiment_id"] != service_experiment:
            return (f"its scan run {run_id} is not the scan service's (experiment "
                    f"{escape(run['experiment_id'])}, not {service_experiment})")
        if recorded != tags["scan_verdict"]:
            return (f"scan_verdict={escape(tags['scan_verdict'])} but its scan run "
                    f"{run_id} recorded {escape(recorded)}")
        if not seal_holds(secret, name, version, tags):
            return "its verdict tags do not match the scan service's seal (edited by hand)"
        scanned = run["tags"].get("scan.files_key", "")
        if files_key is not None and not scanned:
            return f"its scan run {run_id} recorded no model key of the files it scanned"
        if files_key is not None and scanned != files_key():
            return (f"its scan run {run_id} scanned other files (model key "
                    f"{escape(scanned[:12])}, not this version's)")
        return ""
    if pipelines_trusted and _evaluate_backs(run, tags):
        return ""
    if not pipelines_trusted and run["tags"].get("mesa.stage") == "evaluate":
        return (f"its verdict comes from a pipeline run ({run_id}), not from the scan service; "
                "with accounts only the service's verdicts hold")
    return f"run {run_id} recorded no verdict {escape(tags['scan_verdict'])} for it"


def _finding(kind: str, name: str, version: str, text: str) -> dict[str, Any]:
    logger().warning("FINDING %s %s/%s: %s", kind, escape(name), version, text)
    return {"kind": kind, "model": escape(name), "version": version, "text": text,
            "time": time.time()}


def _reset(name: str, version: str, why: str) -> str:
    """Quarantine an unbacked verdict and mark the version for a new scan; what was done."""
    removed = quarantine(name, version)
    tracking.tag_model_version(name, version, {
        "scan_verdict": "not scanned", "scan_tampered": why[:500],
        "scan_seal": ""})
    aliases = ", ".join("@" + escape(a) for a in removed)
    return f"quarantined{f' (aliases {aliases} removed)' if removed else ''} and scanned again"


class FileKeys:
    """The model key of each registry version's files, kept in `<state>/version_keys.json`.

    A version's source never changes, but its files are artifacts of the publisher's upload
    run, which the publisher may write again after the version was cleared: the key of a
    cleared version is computed afresh (downloaded and hashed) at every audit, so files swapped
    after the scan are found; other versions' keys are computed once (their verdicts are not
    trusted to load anything). The cost: each audit downloads every cleared watched version."""

    def __init__(self, params: Params) -> None:
        self.state = Path(params.scan.state_folder)
        self.path = self.state / "version_keys.json"
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}

    def of(self, version: dict[str, Any], fresh: bool = False) -> str:
        """The key of `version`'s files (downloaded into the state folder the first time, and
        every time when `fresh`)."""
        from tasks.scan.discover import fetch_version, files_key

        ref = f"{version['name']}/{version['version']}@{version['source']}"
        if fresh or ref not in self.known:
            self.known[ref] = files_key(fetch_version.fn(version, self.state / "work").files)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.known, sort_keys=True), encoding="utf-8")
        return self.known[ref]


def audit(params: Params) -> list[dict[str, Any]]:
    """Check every watched version's verdict and every alias; fix and report what is wrong."""
    secret = seal_secret(params)
    versions = tracking.model_versions(params.scan.registry_models)
    keys = FileKeys(params)
    service = _service_experiment()
    findings = []
    for v in versions:
        if v["tags"].get("scan_verdict") not in VERDICTS:
            continue
        try:
            with verdicts_of(v["name"], params):
                findings += _check(v, secret, keys, service, params)
        except Timeout:  # a scan still writing: its verdict is checked at the next audit
            logger().warning("audit: %s/%s skipped, a scan held its verdict lock %.0f s",
                             escape(v["name"]), v["version"], LOCK_WAIT)
    for name in sorted({v["name"] for v in versions}):
        findings += _alias_findings(name, {v["version"]: v["tags"] for v in versions
                                           if v["name"] == name})
        summarise(name)
    _record(params, findings)
    return findings


def _check(v: dict[str, Any], secret: str, keys: FileKeys, service: str, params: Params
           ) -> list[dict[str, Any]]:
    """The audit of one version, on its tags as they are now (the list was read unlocked)."""
    name, version = v["name"], v["version"]
    tags = tracking.model_version_tags(name, version)
    if tags.get("scan_verdict") not in VERDICTS:
        return []
    cleared = tags["scan_verdict"] == "clean"
    why = unbacked(name, version, tags, secret, lambda: keys.of(v, cleared), service,
                   pipelines_trusted=not params.platform.auth)
    if not why:
        return []
    return [_finding("unbacked-verdict", name, version, f"{why}; {_reset(name, version, why)}")]


def _service_experiment() -> str:
    """Id of the scan service's experiment (a placeholder no run has, before it exists)."""
    found = tracking.client().get_experiment_by_name(tracking.scan_experiment())
    return found.experiment_id if found is not None else "(none yet)"


def verdict_backing(name: str, version: str, tags: dict[str, str], params: Params) -> str:
    """The audit's test for one version: why its verdict is not a backed scan ('' if it is)."""
    match = [v for v in tracking.model_versions((name,)) if v["version"] == version]
    if not match:
        return f"no registered version {escape(name)}/{version}"
    return unbacked(name, version, tags, seal_secret(params),
                    lambda: FileKeys(params).of(match[0], tags.get("scan_verdict") == "clean"),
                    _service_experiment(),
                    pipelines_trusted=not params.platform.auth)


def distrust(name: str, version: str, why: str, params: Params) -> dict[str, Any]:
    """Quarantine a version whose verdict is not backed and mark it for a new scan; the
    finding (also in findings.jsonl)."""
    found = _finding("unbacked-verdict", name, version, f"{why}; {_reset(name, version, why)}")
    _record(params, [found])
    return found


def _alias_findings(name: str, tags_of: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Aliases that point at a quarantined version are findings; they are removed."""
    found = []
    for alias, version in tracking.model_aliases(name).items():
        tags = tracking.model_version_tags(name, version) if version in tags_of else {}
        if alias != QUARANTINE_ALIAS and is_quarantined(tags):
            tracking.delete_alias(name, alias)
            found.append(_finding("alias-on-quarantined", name, version,
                                  f"alias @{escape(alias)} pointed at this quarantined version;"
                                  " removed"))
    return found


def guard_alias(name: str, version: str, alias: str, params: Params) -> dict[str, Any] | None:
    """The registry reported `alias` put on `version`: take it off again if the version is
    quarantined, hold it (`hold`: given back when a scan clears the version) if no scan has
    cleared it, and distrust the version (quarantined, scanned again) if its clean verdict is
    not a backed scan (a publisher may put any tags on a version it creates). The finding (also
    in findings.jsonl), or None if the alias may stand."""
    if alias == QUARANTINE_ALIAS:
        return None
    with verdicts_of(name, params):
        return _guard_alias(name, version, alias, params)


def _guard_alias(name: str, version: str, alias: str, params: Params) -> dict[str, Any] | None:
    if tracking.model_aliases(name).get(alias) != version:
        return None  # moved on already
    tags = tracking.model_version_tags(name, version)
    if is_quarantined(tags):
        tracking.delete_alias(name, alias)
        found = _finding("alias-on-quarantined", name, version,
                         f"alias @{escape(alias)} was put on this quarantined version; removed")
    elif tags.get("scan_verdict") != "clean" or tags.get("scan_status") == "pending":
        hold(name, version)
        found = _finding("alias-on-unscanned", name, version,
                         f"alias @{escape(alias)} was put on a version no scan has cleared; "
                         "held until one does")
    elif why := verdict_backing(name, version, tags, params):
        return distrust(name, version, f"alias @{escape(alias)} on a verdict no scan backs: "
                        f"{why}", params)
    else:
        return None
    _record(params, [found])
    return found


def _record(params: Params, findings: list[dict[str, Any]]) -> None:
    if not findings:
        return
    path = Path(params.scan.state_folder) / "findings.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for f in findings:
            fh.write(json.dumps(f, sort_keys=True) + "\n")


def summarise(name: str) -> None:
    """The registered model's tags carry its latest verdict, the word first and the keys short
    (the model list shows `key: value` cut to its column: `scan: backdoored (v3)`). The audit
    writes them again from the versions' tags: a publisher may edit a registered model's."""
    versions = [v for v in tracking.model_versions((name,))
                if v["tags"].get("scan_verdict") in VERDICTS]
    if not versions:
        return
    latest = max(versions, key=lambda v: int(v["version"]))
    held = sorted(int(v["version"]) for v in versions if is_quarantined(v["tags"]))
    tracking.set_model_tags(name, {
        "scan": f"{latest['tags']['scan_verdict']} (v{latest['version']})",
        "quarantined": ", ".join(f"v{k}" for k in held) or "none"})
