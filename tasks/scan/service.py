"""The scan service's bookkeeping around the flows: servers, discovery, dedup, claims, ledger.

flows/scan.py only wires these together. `discover` finds unscanned models (the drop folder and
the Model Registry, tasks.scan.discover); `triage` sorts them into the ones this run claims
(exactly once, tasks.scan.claims), the ones another run holds, the ones whose files were scanned
before (their verdict is reused) and twins (the same files found twice in this run); `settle`
records finished scans (done records, the drop-folder ledger) and `release_unfinished` frees the
claim of every model that was not scanned to the end, so the next run finds it again.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from mesa_lib import modelfiles
from tasks.common import tracking
from tasks.common.escape import escape
from tasks.common.params import ConfigError, Params, load_params
from tasks.common.tracking import TrackingError
from tasks.scan import quarantine
from tasks.scan.check import logger
from tasks.scan.claims import ClaimStore, Ledger
from tasks.scan.discover import (
    REFERENCE_SUFFIX,
    UNSCANNED,
    Candidate,
    drop_candidates,
    fetch_version,
    model_key,
    unscanned_versions,
)
from tasks.scan.record import reuse_verdict

DEPLOYMENT = "scan-new-models"
EVENT_DEPLOYMENT = "scan-on-event"
ALIAS_DEPLOYMENT = "guard-aliases"


class ServerError(RuntimeError):
    """The Prefect API is configured but does not answer."""


def task_runner(params: Params) -> Any:
    """Threads (default) or Dask: a scheduler at `scan.dask_address`, else a local cluster."""
    s = params.scan
    if s.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if s.dask_address:
            return DaskTaskRunner(address=s.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": s.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": ":0"})
    return ThreadPoolTaskRunner(max_workers=s.workers)


def store_folder(params: Params) -> Path:
    """The part of the state folder that belongs to this tracking store:
    `<state>/stores/<sha256 of the tracking URI, 16 hex>/` (the URI in its `store.txt`).

    Claims, done records and the ledger say "these files were scanned, here is the run": a run
    that lives in another store (a local `python -m flows.scan model` writes to ./mlflow.db) must
    never stand in for a scan on the server, so each store has its own."""
    uri = tracking.tracking_uri()
    folder = Path(params.scan.state_folder) / "stores" / hashlib.sha256(
        uri.encode()).hexdigest()[:16]
    if not (folder / "store.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shown = re.sub(r"//[^/@]*@", "//", uri)  # never a password on disk
        (folder / "store.txt").write_text(escape(shown) + "\n", encoding="utf-8")
    return folder


def claim_store(params: Params) -> ClaimStore:
    """Claims and done records of this tracking store (`store_folder`)."""
    return ClaimStore(store_folder(params), params.scan.claim_timeout_s)


def ledger(params: Params) -> Ledger:
    """The drop-folder ledger of this tracking store (`store_folder`)."""
    return Ledger(store_folder(params) / "ledger.jsonl")


# --------------------------------------------------------------------------- servers


def preflight() -> None:
    """The MLflow server answers (or the local store opens) before anything is claimed."""
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)  # every time: the client below is cached per process
    tracking.client(uri)


def sweep(params: Params) -> list[dict[str, Any]]:
    """At each start: fail the scan runs of killed processes, then audit the registry
    (tasks.scan.quarantine.audit): aliases on quarantined versions, verdicts no scan wrote."""
    for run_id in tracking.fail_orphaned_runs():
        logger().warning("marked scan run %s FAILED: its process was killed", run_id)
    return quarantine.audit(params)


def check_prefect(timeout: float = 3.0) -> None:
    """Fail fast if PREFECT_API_URL is set but the server does not answer /health."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # no server configured: Prefect runs an ephemeral one in-process
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
            return
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ServerError(f"Prefect server {url} is not reachable ({err}). Start it "
                          "(scripts/scan_services.sh start) or unset PREFECT_API_URL.") from None


# --------------------------------------------------------------------------- discovery


def discover(params: Params, book: Ledger) -> list[Candidate]:
    """New drop-folder groups, then registry versions without a verdict (downloaded)."""
    work = Path(params.scan.state_folder) / "work"
    found = drop_candidates(params, book)
    pending = unscanned_versions(params)
    for v in pending:  # before the scan: no alias on an unscanned version
        quarantine.hold(v["name"], v["version"])
    return found + [fetch_version(v, work) for v in pending]


@dataclass
class Triage:
    """What one discovery run does with each model it found."""

    claimed: list[Candidate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # claimed by another run right now
    reused: list[str] = field(default_factory=list)  # scanned before: the verdict is copied
    twins: list[Candidate] = field(default_factory=list)  # same files as a claimed model

    @property
    def new(self) -> int:
        return len(self.claimed) + len(self.skipped) + len(self.reused)


def ledger_entry(cand: Candidate, outcome: dict[str, Any]) -> dict[str, Any]:
    """The ledger line of a processed drop-folder group."""
    return {"files": [list(s) for s in cand.stats], "key": cand.key, "label": cand.label,
            "status": outcome["status"], "model_version": outcome.get("model_version", ""),
            "run_id": outcome.get("run_id", ""), "time": time.time()}


def reuse(cand: Candidate, done: dict[str, Any], book: Ledger, params: Params) -> str:
    """Give a candidate whose files were scanned already that scan's verdict."""
    if cand.source == "registry":
        reuse_verdict(cand, done, params)
    elif cand.stats:
        book.append(ledger_entry(cand, done))
    return cand.label


def triage(found: list[Candidate], store: ClaimStore, book: Ledger, owner: str,
           params: Params) -> Triage:
    """Claim each new model once; reuse verdicts of files scanned before; skip the rest."""
    plan, seen = Triage(), set()
    for cand in found:
        if cand.key in seen:
            plan.twins.append(cand)  # the same files twice (dropped and registered)
            continue
        seen.add(cand.key)
        done = store.done(cand.key)
        if done is not None:
            plan.reused.append(reuse(cand, done, book, params))
        elif store.acquire(cand.key, owner=owner):
            plan.claimed.append(cand)
        else:
            plan.skipped.append(cand.label)
    logger().info("discovered %d new model(s): %d claimed, %d held by another run, %d known",
                  plan.new, len(plan.claimed), len(plan.skipped), len(plan.reused))
    return plan


def reuse_twins(twins: list[Candidate], store: ClaimStore, book: Ledger,
                params: Params) -> list[str]:
    """Twins of models scanned in this run get their verdict."""
    return [reuse(t, d, book, params) for t in twins if (d := store.done(t.key)) is not None]


# --------------------------------------------------------------------------- outcomes


def failure(cand: Candidate, err: Exception) -> dict[str, Any]:
    """The outcome of a model whose scan could not finish (it stays unscanned)."""
    reason = escape(f"{type(err).__name__}: {err}")  # may quote names from outside
    logger().error("FAILED %s: %s (stays unscanned; the next run retries)", cand.label, reason)
    return {"key": cand.key, "label": cand.label, "status": "failed", "reason": reason}


def settle(claimed: list[Candidate], outcomes: list[dict[str, Any]], store: ClaimStore,
           book: Ledger) -> None:
    """Done records (which release the claims) and ledger lines of the finished scans."""
    by_key = {c.key: c for c in claimed}
    for outcome in outcomes:
        cand = by_key[outcome["key"]]
        if outcome["status"] == "failed":
            continue
        store.finish(cand.key, {**outcome, "finished": time.time()})
        if cand.source == "drop" and cand.stats:
            book.append(ledger_entry(cand, outcome))


def release_unfinished(claimed: list[Candidate], store: ClaimStore) -> None:
    """Free the claim of every model not scanned to the end: the next run finds it again."""
    for cand in claimed:
        if store.done(cand.key) is None:
            store.release(cand.key)


def raise_failures(outcomes: list[dict[str, Any]]) -> None:
    """End the run failed, naming every model that stays unscanned."""
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} models could not be scanned and "
                           "stay unscanned for the next run: "
                           + "; ".join(f"{o['label']}: {o['reason']}" for o in failed))


def event_candidate(model: str, params: Params) -> Candidate | None:
    """The registry version NAME/VERSION an event names, if it still needs a scan (the poll
    or an earlier event may have scanned it already)."""
    name, _, version = model.rpartition("/")
    if not name:
        raise FileNotFoundError(f"{escape(model)}: no such registered model version")
    with quarantine.verdicts_of(name, params):  # not between a scan's tag writes
        match = [v for v in tracking.model_versions((name,)) if v["version"] == version]
        if not match:
            raise FileNotFoundError(f"{escape(model)}: no such registered model version")
        tags = match[0]["tags"]
        if tags.get("scan_verdict", "") not in UNSCANNED:
            why = quarantine.verdict_backing(name, version, tags, params)
            if not why:
                return None
            quarantine.distrust(name, version, why, params)  # tags it came with: not a scan's
        quarantine.hold(name, version)  # before the scan: no alias on an unscanned version
    return fetch_version(match[0], Path(params.scan.state_folder) / "work")


def candidate(model: str, params: Params) -> Candidate:
    """A file pair (path with or without suffix) or a registry version NAME/VERSION."""
    path = Path(model)
    stem = modelfiles.stem(path)
    files = [p for p in (*modelfiles.files(stem), Path(f"{stem}{REFERENCE_SUFFIX}"))
             if p.is_file()]
    if files:
        key, sha = model_key(files)
        return Candidate(key, "drop", f"file:{escape(stem.name)}", tuple(str(p) for p in files),
                         sha)
    name, _, version = model.removeprefix("registry:").rpartition("/")
    match = [v for v in tracking.model_versions((name,)) if v["version"] == version]
    if not name or not match:
        raise FileNotFoundError(f"{escape(model)}: neither a model file pair nor a registered "
                                "version")
    return fetch_version(match[0], Path(params.scan.state_folder) / "work")


def event_trigger(params_path: str) -> Any:
    """Run `scan-event` for the version each `mlflow.model_version.created` event names."""
    from prefect.events import DeploymentEventTrigger

    from tasks.scan.webhook import EVENT, NAME_LABEL, VERSION_LABEL

    model = f"{{{{ event.resource['{NAME_LABEL}'] }}}}/{{{{ event.resource['{VERSION_LABEL}'] }}}}"
    return DeploymentEventTrigger(name="registry model_version.created", expect={EVENT},
                                  parameters={"model": model, "params_path": params_path})


def alias_trigger(params_path: str) -> Any:
    """Run `scan-alias` for each `mlflow.model_version_alias.created` event."""
    from prefect.events import DeploymentEventTrigger

    from tasks.scan.webhook import ALIAS_EVENT, ALIAS_LABEL, NAME_LABEL, VERSION_LABEL

    model = f"{{{{ event.resource['{NAME_LABEL}'] }}}}/{{{{ event.resource['{VERSION_LABEL}'] }}}}"
    alias = f"{{{{ event.resource['{ALIAS_LABEL}'] }}}}"
    return DeploymentEventTrigger(name="registry model_version_alias.created",
                                  expect={ALIAS_EVENT},
                                  parameters={"model": model, "alias": alias,
                                              "params_path": params_path})


def schedule(params: Params) -> dict[str, Any]:
    """`flow.serve` schedule arguments from `scan.interval_s` / `scan.cron`."""
    s = params.scan
    return {"interval": timedelta(seconds=s.interval_s)} if s.interval_s else {"cron": s.cron}


# --------------------------------------------------------------------------- command line


def cli(argv: list[str] | None, once: Callable[..., Any], model: Callable[..., Any],
        serve: Callable[[str], None]) -> None:
    """`python -m flows.scan once | model PATH | serve`: check params and both servers first."""
    ap = argparse.ArgumentParser(prog="python -m flows.scan",
                                 description="The scan service (docs/scanning.md).")
    ap.add_argument("command", choices=("once", "model", "serve"))
    ap.add_argument("model", nargs="?", help="for `model`: file pair path or NAME/VERSION")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params_path = str(Path(args.params).resolve())
    try:
        load_params(params_path)
        check_prefect()
        preflight()
    except (ConfigError, TrackingError, ServerError) as err:
        sys.exit(f"error: {err}")
    try:
        if args.command == "serve":
            serve(params_path)
        elif args.command == "model":
            if not args.model:
                ap.error("`model` needs a path or NAME/VERSION")
            print(model(model=args.model, params_path=params_path))
        else:
            print(once(params_path=params_path))
    except Exception as err:  # the flow logged the details; end with the cause
        sys.exit(f"error: scan failed: {type(err).__name__}: {err}")
