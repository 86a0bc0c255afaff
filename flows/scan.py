"""The scan service: Prefect flows auditing every arriving model for a backdoor (docs/scanning.md).

    python -m flows.scan once  [--params params.yaml]    # discover and scan new models now
    python -m flows.scan model PATH | NAME/VERSION        # scan one model file pair or version
    python -m flows.scan serve [--params params.yaml]    # the scheduled deployment (flow.serve)

`scan-discover` finds unscanned models (tasks.discover: the drop folder and the Model Registry),
claims each by its key (tasks.claims: exactly once, even when runs overlap), and hands the
claimed ones to the `scan-batch` sub-flow, whose task runner (threads, or Dask for a cluster:
`scan.task_runner`) fans out the checks, the per-class-chunk MESA fits and the recording of
every model. A model whose scan failed (say, the MLflow server went down) is released and found
again by the next run; servers are checked first, so a down one is a clear error in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import tracking
from tasks.claims import ClaimStore, Ledger
from tasks.config import ConfigError, Params, load_params
from tasks.discover import Candidate, drop_candidates, fetch_version, model_key, unscanned_versions
from tasks.scan import check_model, logger, scan_chunk
from tasks.scan_core import chunks
from tasks.scan_record import record, repair_and_register, reuse_verdict
from tasks.tracking import TrackingError

DEPLOYMENT = "scan-new-models"


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


def claim_store(params: Params) -> ClaimStore:
    """Claims and done records under `scan.state_folder`."""
    return ClaimStore(Path(params.scan.state_folder), params.scan.claim_timeout_s)


def ledger(params: Params) -> Ledger:
    """The drop-folder ledger under `scan.state_folder`."""
    return Ledger(Path(params.scan.state_folder) / "ledger.jsonl")


# validate_parameters=False: a served run loads this file by path, where pydantic cannot resolve
# the postponed `list[Candidate]` annotation; the callers pass the records themselves.
@flow(name="scan-batch", validate_parameters=False)
def scan_batch(candidates: list[Candidate], params_path: str) -> list[dict[str, Any]]:
    """Check, fit (per class chunk) and record every claimed model; one failure stops none."""
    params = load_params(params_path)
    checks = [check_model.submit(c, params) for c in candidates]
    pending = []
    for cand, future in zip(candidates, checks, strict=True):
        try:
            checked = future.result()
        except Exception as err:  # noqa: BLE001 - recorded as this model's failure
            pending.append((cand, None, [], err))
            continue
        parts = [scan_chunk.submit(checked, c, params)
                 for c in chunks(checked.n_classes, params.scan.class_chunks)] if checked.ok else []
        pending.append((cand, checked, parts, record.submit(checked, parts, params)))
    outcomes = []
    for cand, checked, parts, future in pending:
        try:
            if isinstance(future, Exception):
                raise future
            outcome = future.result()
        except Exception as err:  # noqa: BLE001
            logger().error("FAILED %s: %s: %s (stays unscanned; the next run retries)",
                           cand.label, type(err).__name__, err)
            outcomes.append({"key": cand.key, "label": cand.label, "status": "failed",
                             "reason": f"{type(err).__name__}: {err}"})
            continue
        if params.scan.repair and outcome["status"] == "backdoored":
            try:
                outcome |= repair_and_register(checked, [p.result() for p in parts], outcome,
                                               params)
            except Exception as err:  # noqa: BLE001 - the verdict stands without a repair
                logger().error("repair of %s failed: %s", cand.label, err)
                outcome["repair_error"] = str(err)
        outcomes.append(outcome)
    return outcomes


def _ledger_entry(cand: Candidate, outcome: dict[str, Any]) -> dict[str, Any]:
    return {"files": [list(s) for s in cand.stats], "key": cand.key, "label": cand.label,
            "status": outcome["status"], "model_version": outcome.get("model_version", ""),
            "run_id": outcome.get("run_id", ""), "time": time.time()}


def scan_claimed(claimed: list[Candidate], params: Params, params_path: str,
                 store: ClaimStore) -> list[dict[str, Any]]:
    """Run the batch on claimed candidates; finish or release every claim, whatever happens."""
    outcomes: list[dict[str, Any]] = []
    try:
        if claimed:
            runner = scan_batch.with_options(task_runner=task_runner(params))
            outcomes = runner(claimed, params_path)
        by_key = {c.key: c for c in claimed}
        for outcome in outcomes:
            cand = by_key[outcome["key"]]
            if outcome["status"] == "failed":
                continue
            store.finish(cand.key, {**outcome, "finished": time.time()})
            if cand.source == "drop" and cand.stats:
                ledger(params).append(_ledger_entry(cand, outcome))
    finally:
        for cand in claimed:
            if store.done(cand.key) is None:
                store.release(cand.key)  # not scanned to the end: found again next run
    return outcomes


def _preflight() -> None:
    """The MLflow server answers (or the local store opens) before anything is claimed."""
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)  # every time: the client below is cached per process
    tracking.client(uri)


def _raise_failures(outcomes: list[dict[str, Any]]) -> None:
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} models could not be scanned and "
                           "stay unscanned for the next run: "
                           + "; ".join(f"{o['label']}: {o['reason']}" for o in failed))


@flow(name="scan-discover")
def discover_and_scan(params_path: str = "params.yaml") -> dict[str, Any]:
    """Find unscanned models (drop folder, registry), claim them, scan each exactly once."""
    params = load_params(params_path)
    _preflight()
    log, store, book = logger(), claim_store(params), ledger(params)
    work = Path(params.scan.state_folder) / "work"
    found = drop_candidates(params, book)
    found += [fetch_version(v, work) for v in unscanned_versions(params)]
    claimed, skipped, reused, twins, seen = [], [], [], [], set()
    for cand in found:
        if cand.key in seen:
            twins.append(cand)  # the same files twice (dropped and registered): scanned once
            continue
        seen.add(cand.key)
        done = store.done(cand.key)
        if done is not None:  # the same files were scanned before: reuse, do not rescan
            reused.append(_reuse(cand, done, book))
        elif store.acquire(cand.key, owner=str(flow_run.id or "")):
            claimed.append(cand)
        else:
            skipped.append(cand.label)
    log.info("discovered %d new model(s): %d claimed, %d held by another run, %d known",
             len(seen), len(claimed), len(skipped), len(reused))
    outcomes = scan_claimed(claimed, params, params_path, store)
    reused += [_reuse(t, d, book) for t in twins if (d := store.done(t.key)) is not None]
    _raise_failures(outcomes)
    return {"scanned": outcomes, "claimed_elsewhere": skipped, "reused": reused}


def _reuse(cand: Candidate, done: dict[str, Any], book: Ledger) -> str:
    """Give a candidate whose files were scanned already that scan's verdict."""
    if cand.source == "registry":
        reuse_verdict({"name": cand.name, "version": cand.version}, done)
    elif cand.stats:
        book.append(_ledger_entry(cand, done))
    return cand.label


def _candidate(model: str, params: Params) -> Candidate:
    """A file pair (path with or without suffix) or a registry version NAME/VERSION."""
    path = Path(model)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    files = [p for p in (stem.with_name(stem.name + s) for s in (".safetensors", ".json",
                                                                  ".data.npz")) if p.is_file()]
    if files:
        key, sha = model_key(files)
        return Candidate(key, "drop", f"file:{stem.name}", tuple(str(p) for p in files), sha)
    name, _, version = model.removeprefix("registry:").rpartition("/")
    match = [v for v in tracking.model_versions((name,)) if v["version"] == version]
    if not name or not match:
        raise FileNotFoundError(f"{model}: neither a model file pair nor a registered version")
    return fetch_version(match[0], Path(params.scan.state_folder) / "work")


@flow(name="scan-model")
def scan_model(model: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """Scan one model now (even if scanned before, unless a scan of it is in progress)."""
    params = load_params(params_path)
    _preflight()
    store = claim_store(params)
    cand = _candidate(model, params)
    if not store.acquire(cand.key, owner=str(flow_run.id or "")):
        raise RuntimeError(f"{cand.label} is being scanned by another run right now")
    (outcome,) = scan_claimed([cand], params, params_path, store)
    _raise_failures([outcome])
    return outcome


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


def serve(params_path: str) -> None:
    """Serve `scan-discover` as a deployment on the schedule of `scan.interval_s` / `scan.cron`."""
    s = load_params(params_path).scan
    schedule: dict[str, Any] = ({"interval": timedelta(seconds=s.interval_s)} if s.interval_s
                                else {"cron": s.cron})
    discover_and_scan.serve(name=DEPLOYMENT, parameters={"params_path": params_path},
                            **schedule)


def main(argv: list[str] | None = None) -> None:
    """Command line: check params and both servers first, then run."""
    ap = argparse.ArgumentParser(prog="python -m flows.scan", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("once", "model", "serve"))
    ap.add_argument("model", nargs="?", help="for `model`: file pair path or NAME/VERSION")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params_path = str(Path(args.params).resolve())
    try:
        load_params(params_path)
        check_prefect()
        _preflight()
    except (ConfigError, TrackingError, ServerError) as err:
        sys.exit(f"error: {err}")
    try:
        if args.command == "serve":
            serve(params_path)
        elif args.command == "model":
            if not args.model:
                ap.error("`model` needs a path or NAME/VERSION")
            print(scan_model(model=args.model, params_path=params_path))
        else:
            print(discover_and_scan(params_path=params_path))
    except Exception as err:  # the flow logged the details; end with the cause
        sys.exit(f"error: scan failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
