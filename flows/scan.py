"""The scan service: Prefect flows auditing every arriving model for a backdoor (docs/scanning.md).

    python -m flows.scan once  [--params params.yaml]    # discover and scan new models now
    python -m flows.scan model PATH | NAME/VERSION        # scan one model file pair or version
    python -m flows.scan serve [--params params.yaml]    # both deployments (prefect.serve)

`scan-discover` (deployment `scan-new-models`, on the schedule of `scan.interval_s`) first fails
the runs of killed scans and audits the registry (quarantine findings, verdicts no scan wrote),
then finds unscanned models, claims each exactly once and hands the claimed ones to the
`scan-batch` sub-flow, whose task runner (threads, or Dask: `scan.task_runner`) fans out the
checks, the per-class-chunk fits and the recording of every model. `scan-event` (deployment
`scan-on-event`) scans one registry version at once when the registry's webhook reports it
(tasks.scan.webhook emits the Prefect event its DeploymentEventTrigger waits for); the poll
stays as the backstop. `scan-alias` (deployment `guard-aliases`) takes an alias off a version
the moment the registry reports it put there, if no scan has cleared the version. The
bookkeeping (servers, dedup, claims, ledger) is tasks.scan.service; this module only wires
tasks.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect import serve as serve_deployments
from prefect.runtime import flow_run

from tasks.common.params import Params, load_params
from tasks.scan import quarantine, service
from tasks.scan.check import check_model, scan_chunk
from tasks.scan.discover import Candidate
from tasks.scan.record import record, repair_and_register
from tasks.scan.reference import chunks


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
            outcomes.append(service.failure(cand, err))
            continue
        if params.scan.repair and outcome["status"] == "backdoored":
            outcome |= repair(checked, parts, outcome, params)
        outcomes.append(outcome)
    return outcomes


def repair(checked: Any, parts: list, outcome: dict[str, Any], params: Params) -> dict[str, Any]:
    """Repair a backdoored model and register it; the verdict stands if that fails."""
    try:
        return repair_and_register(checked, [p.result() for p in parts], outcome, params)
    except Exception as err:  # noqa: BLE001
        service.logger().error("repair of %s failed: %s", checked.candidate.label, err)
        return {"repair_error": str(err)}


def scan_claimed(claimed: list[Candidate], params: Params, params_path: str,
                 store: service.ClaimStore) -> list[dict[str, Any]]:
    """Run the batch on claimed candidates; finish or release every claim, whatever happens."""
    try:
        outcomes: list[dict[str, Any]] = []
        if claimed:
            runner = scan_batch.with_options(task_runner=service.task_runner(params))
            outcomes = runner(claimed, params_path)
        service.settle(claimed, outcomes, store, service.ledger(params))
        return outcomes
    finally:
        service.release_unfinished(claimed, store)


@flow(name="scan-discover")
def discover_and_scan(params_path: str = "params.yaml") -> dict[str, Any]:
    """Find unscanned models (drop folder, registry), claim them, scan each exactly once."""
    params = load_params(params_path)
    service.preflight()
    findings = service.sweep(params)
    store, book = service.claim_store(params), service.ledger(params)
    plan = service.triage(service.discover(params, book), store, book, str(flow_run.id or ""),
                          params)
    outcomes = scan_claimed(plan.claimed, params, params_path, store)
    reused = plan.reused + service.reuse_twins(plan.twins, store, book, params)
    service.raise_failures(outcomes)
    return {"scanned": outcomes, "claimed_elsewhere": plan.skipped, "reused": reused,
            "findings": findings}


@flow(name="scan-event")
def scan_event(model: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """Scan the registry version NAME/VERSION an event reported, unless scanned already."""
    params = load_params(params_path)
    service.preflight()
    cand = service.event_candidate(model, params)
    if cand is None:
        return {"skipped": model, "why": "it has a verdict already"}
    store, book = service.claim_store(params), service.ledger(params)
    plan = service.triage([cand], store, book, str(flow_run.id or ""), params)
    outcomes = scan_claimed(plan.claimed, params, params_path, store)
    service.raise_failures(outcomes)
    return {"scanned": outcomes, "claimed_elsewhere": plan.skipped, "reused": plan.reused}


@flow(name="scan-alias")
def scan_alias(model: str, alias: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """An alias was put on NAME/VERSION: take it off again unless a scan cleared the version."""
    params = load_params(params_path)
    service.preflight()
    name, _, version = model.rpartition("/")
    return {"model": model, "alias": alias,
            "finding": quarantine.guard_alias(name, version, alias, params)}


@flow(name="scan-model")
def scan_model(model: str, params_path: str = "params.yaml") -> dict[str, Any]:
    """Scan one model now, even if scanned before; if another run is scanning it (say, the
    service's event run on a version just registered), wait for that run to end first."""
    params = load_params(params_path)
    service.preflight()
    store = service.claim_store(params)
    cand = service.candidate(model, params)
    owner = str(flow_run.id or "")
    if not store.acquire(cand.key, owner=owner):
        holder = store.holder(cand.key)
        service.logger().warning("%s is being scanned by another run (claim %s); waiting for it",
                                 cand.label, holder)
        if not store.acquire_waiting(cand.key, owner=owner):
            raise RuntimeError(f"{cand.label} stayed claimed by another run ({holder}) for "
                               f"{store.timeout_s:.0f} s (scan.claim_timeout_s)")
    (outcome,) = scan_claimed([cand], params, params_path, store)
    service.raise_failures([outcome])
    return outcome


def serve(params_path: str) -> None:
    """Serve `scan-discover` on the schedule of `scan.interval_s` / `scan.cron`, `scan-event`
    on the registry's `model_version.created` events and `scan-alias` on its
    `model_version_alias.created` events (tasks.scan.webhook)."""
    params = load_params(params_path)
    service.sweep(params)  # runs a kill -9 left RUNNING: failed at the next start
    poll = discover_and_scan.to_deployment(name=service.DEPLOYMENT,
                                           parameters={"params_path": params_path},
                                           **service.schedule(params))
    event = scan_event.to_deployment(name=service.EVENT_DEPLOYMENT,
                                     parameters={"params_path": params_path},
                                     triggers=[service.event_trigger(params_path)])
    alias = scan_alias.to_deployment(name=service.ALIAS_DEPLOYMENT,
                                     parameters={"params_path": params_path},
                                     triggers=[service.alias_trigger(params_path)])
    serve_deployments(poll, event, alias, query_seconds=params.platform.runner_poll_s)


def main(argv: list[str] | None = None) -> None:
    """Command line (tasks.scan.service.cli)."""
    service.cli(argv, discover_and_scan, scan_model, serve)


if __name__ == "__main__":
    main()
