"""The registry webhook receiver: MLflow posts `model_version.created` and
`model_version_alias.created`, we emit a Prefect event for each.

MLflow (3.3+, SQL backends) signs each webhook post with HMAC-SHA256: header
`X-MLflow-Signature: v1,<base64 HMAC(secret, "<delivery id>.<timestamp>.<body>")>` beside
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. The receiver (Starlette, 127.0.0.1) refuses a
post whose signature does not hold or whose timestamp is more than 5 minutes off (401), and a
delivery id it has accepted before (409: a replay inside the window starts nothing; the ids are
kept in the state folder's `webhook_deliveries.sqlite` for twice the window, so a restart does
not reopen it). For each new version it emits the Prefect event `mlflow.model_version.created`
whose resource names the version, and the scan deployment's DeploymentEventTrigger
(flows/scan.py) runs `scan-event` for it at once; for each alias put on a version,
`mlflow.model_version_alias.created`, on which `scan-alias` takes the alias off again if the
version is quarantined, not yet cleared, or cleared by tags no scan backs (a publisher may put
any tags on a version it creates; tasks.scan.quarantine.guard_alias): the event path, not the
next poll, undoes a hand-moved alias. (Later tag edits need no such path: only the service
account may make them, tasks.scan.auth.) Prefect's own inbound webhooks are a Prefect Cloud
feature, hence this small receiver.

    python -m tasks.scan.webhook serve    [--params params.yaml]   # the receiver
    python -m tasks.scan.webhook register [--params params.yaml]   # MLflow -> the receiver

Both read the secret (MESA_WEBHOOK_SECRET or the state folder's credentials, tasks.scan.auth);
`serve` needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING with auth on), `register` needs
MLFLOW_TRACKING_URI (and the MLflow credentials). The MLflow server must allow a plain-HTTP
local receiver: MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true
(scripts/scan_services.sh sets both for the server it starts, on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.escape import escape

EVENT = "mlflow.model_version.created"
ALIAS_EVENT = "mlflow.model_version_alias.created"
NAME_LABEL = "mlflow.model.name"
VERSION_LABEL = "mlflow.model.version"
ALIAS_LABEL = "mlflow.model.alias"
# MLflow's (entity, action) -> the Prefect event we emit
EVENTS = {("model_version", "created"): EVENT, ("model_version_alias", "created"): ALIAS_EVENT}
WEBHOOK_NAME = "mesa-scan-on-create"
MAX_BODY = 64 << 10  # a version-created payload is well under 1 KiB plus its tags
MAX_SKEW_S = 300
log = logging.getLogger("mesa.webhook")


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature header value for a post."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> str:
    """Why a post is refused ('' if its signature holds and it is fresh)."""
    delivery = headers.get("x-mlflow-delivery-id", "")
    stamp = headers.get("x-mlflow-timestamp", "")
    given = headers.get("x-mlflow-signature", "")
    if not (delivery and stamp and given):
        return "missing X-MLflow-Signature / -Delivery-Id / -Timestamp header"
    if not stamp.isdigit() or abs((now or time.time()) - int(stamp)) > MAX_SKEW_S:
        return f"timestamp {escape(stamp)[:20]!r} is not within {MAX_SKEW_S} s of now"
    if not hmac.compare_digest(given, signature(secret, delivery, stamp, body)):
        return "signature does not match"
    return ""


class Deliveries:
    """The delivery ids accepted in the last 2 x MAX_SKEW_S seconds (SQLite: one writer at a time
    across threads and processes).

    Args:
        path: the SQLite file; ":memory:" keeps them in this object only.
    """

    def __init__(self, path: Path | str = ":memory:") -> None:
        self.path = str(path)
        self._memory = sqlite3.connect(":memory:", check_same_thread=False) \
            if self.path == ":memory:" else None
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL)")

    def _db(self) -> sqlite3.Connection:
        return self._memory or sqlite3.connect(self.path, timeout=30)

    def first_time(self, delivery_id: str, now: float | None = None) -> bool:
        """Remember `delivery_id`; False if it was accepted before (a replay)."""
        now = time.time() if now is None else now
        with self._db() as db:
            db.execute("DELETE FROM seen WHERE at < ?", (now - 2 * MAX_SKEW_S,))
            try:
                db.execute("INSERT INTO seen VALUES (?, ?)", (delivery_id, now))
            except sqlite3.IntegrityError:
                return False
        return True

    def forget(self, delivery_id: str) -> None:
        """Drop a delivery that was refused or failed after it was remembered."""
        with self._db() as db:
            db.execute("DELETE FROM seen WHERE id = ?", (delivery_id,))


@dataclass(frozen=True)
class Change:
    """A registry change the service acts on: a Prefect event name and the version (and the
    alias, for an alias event)."""

    event: str
    name: str
    version: str
    alias: str = ""


def change_of(payload: Any) -> Change | None:
    """The change a payload reports, None for events the service does not act on.

    Raises:
        ValueError: a watched event whose payload names no usable version or alias.
    """
    if not isinstance(payload, dict):
        return None
    event = EVENTS.get((payload.get("entity"), payload.get("action")))
    if event is None:
        return None
    data = payload.get("data")
    data = data if isinstance(data, dict) else {}
    name, version, alias = data.get("name"), data.get("version"), data.get("alias", "")
    if not isinstance(name, str) or not str(version).isdigit() or not name.isprintable():
        raise ValueError(f"payload names no usable version: name {escape(name)!r}, "
                         f"version {escape(version)!r}")
    if event == ALIAS_EVENT and not (isinstance(alias, str) and alias.isprintable() and alias):
        raise ValueError(f"payload names no usable alias: {escape(alias)!r}")
    return Change(event, name, str(version), alias if event == ALIAS_EVENT else "")


def emit(change: Change) -> str:
    """Emit the Prefect event of a registry change; its id."""
    from prefect.events import emit_event

    resource = {"prefect.resource.id": f"mlflow.model-version.{change.name}.{change.version}",
                NAME_LABEL: change.name, VERSION_LABEL: change.version}
    if change.alias:
        resource[ALIAS_LABEL] = change.alias
    event = emit_event(change.event, resource=resource,
                       payload={"name": change.name, "version": change.version,
                                "alias": change.alias})
    return str(event.id) if event is not None else ""


def make_app(secret: str, emitter: Callable[[Change], str] = emit,
             deliveries: Deliveries | None = None) -> Any:
    """The receiver: POST /webhook (signed, each delivery once), GET /health."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": f"body over {MAX_BODY} bytes"}, status_code=413)
        why = check(secret, {k.lower(): v for k, v in request.headers.items()}, body)
        if why:
            log.warning("refused a webhook post: %s", why)
            return JSONResponse({"error": why}, status_code=401)
        delivery = request.headers["x-mlflow-delivery-id"]
        if not seen.first_time(delivery):
            log.warning("refused a replayed webhook delivery %s", escape(delivery)[:80])
            return JSONResponse({"error": f"delivery {escape(delivery)[:80]} was received "
                                 "before (a replay)"}, status_code=409)
        try:
            found = change_of(json.loads(body))
        except (ValueError, RecursionError) as err:
            log.warning("refused a webhook post: %s", escape(err))
            return JSONResponse({"error": escape(err)[:300]}, status_code=400)
        if found is None:
            return JSONResponse({"ignored": "not an event the scan service acts on"})
        try:
            event_id = emitter(found)
        except Exception:
            seen.forget(delivery)  # not acted on: MLflow's retry of it must get through
            raise
        log.info("%s %s/%s%s: event %s emitted", found.event, escape(found.name),
                 found.version, f" @{escape(found.alias)}" if found.alias else "", event_id)
        return JSONResponse({"emitted": event_id, "event": found.event,
                             "version": f"{found.name}/{found.version}"})

    seen = deliveries or Deliveries()

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/webhook", receive, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def url(params: Any) -> str:
    """Where MLflow posts: the receiver on 127.0.0.1:`platform.webhook_port`."""
    return f"http://127.0.0.1:{params.platform.webhook_port}/webhook"


def register(params: Any, secret: str) -> str:
    """Create or update the registry webhook that posts new versions to the receiver."""
    from tasks.common import tracking

    events = [f"{entity}.{action}" for entity, action in EVENTS]
    return tracking.ensure_webhook(WEBHOOK_NAME, url(params), events, secret)


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.scan.webhook serve | register [--params FILE]`."""
    from tasks.common.params import load_params
    from tasks.scan.auth import credentials, state_folder

    ap = argparse.ArgumentParser(prog="python -m tasks.scan.webhook")
    ap.add_argument("command", choices=("serve", "register"))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    secret = credentials(state_folder(params))["webhook_secret"]
    if args.command == "register":
        print(f"webhook {WEBHOOK_NAME}: {register(params, secret)} -> {url(params)}")
        return
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    deliveries = Deliveries(state_folder(params) / "webhook_deliveries.sqlite")
    uvicorn.run(make_app(secret, deliveries=deliveries), host="127.0.0.1",
                port=params.platform.webhook_port,
                log_level="warning")


if __name__ == "__main__":
    main()
