"""The one tag format of a scan verdict on a registered model version.

Used by the pipeline's `evaluate` stage and by the scan service alike, so a person auditing the
registry reads every verdict the same way. A backdoored or rejected version is also tagged
`quarantined=true` (the scan service then moves its aliases: tasks.scan.quarantine). The scan
service seals its verdicts (`scan_seal`, an HMAC over the version, the verdict and its run with
a secret of the service's state folder): a verdict tag edited by hand no longer matches its seal.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tasks.common.escape import escape

TAG_LIMIT = 4000  # registry tag values are limited in length
# verdicts that quarantine a version: "uncalibrated" (outside what the scanner is calibrated
# on, tasks.scan.coverage) is no clearance, so it is held like a refused file
QUARANTINED = ("backdoored", "rejected", "uncalibrated")
QUARANTINE_ALIAS = "quarantined"
SEALED = ("scan_verdict", "scan_target", "scan_run_id", "scan_key")  # what a seal covers


def is_quarantined(tags: Mapping[str, str]) -> bool:
    """A version is quarantined if tagged so or if its verdict says so."""
    return tags.get("quarantined") == "true" or tags.get("scan_verdict") in QUARANTINED


def verdict_tags(verdict: dict[str, Any], run_id: str) -> dict[str, str]:
    """The tags a scan verdict {status, target, confidence, p_value, detector, reason} puts on
    a model version.

    `scan_verdict` is clean | backdoored | rejected | uncalibrated (or "not scanned" at
    registration); any but clean is also tagged `quarantined`. The reason is escaped (it may
    quote names from outside).
    """
    p_value = verdict.get("p_value")
    tags = {"scan_verdict": verdict["status"],
            "scan_target": "" if verdict["target"] is None else str(verdict["target"]),
            "scan_confidence": f"{verdict['confidence']:.3f}",
            "scan_p_value": "" if p_value is None else f"{p_value:.4f}",
            "scan_detector": verdict.get("detector") or "",
            "scan_reason": escape(verdict.get("reason", ""))[:TAG_LIMIT],
            "scan_run_id": run_id,
            "scan_time": datetime.now(UTC).isoformat(timespec="seconds")}
    if verdict["status"] in QUARANTINED:
        tags["quarantined"] = "true"
    return tags


def seal(secret: str, name: str, version: str, tags: Mapping[str, str]) -> str:
    """HMAC-SHA256 over the version and its sealed verdict tags (hex)."""
    text = "\n".join([name, str(version), *(tags.get(k, "") for k in SEALED)])
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def seal_holds(secret: str, name: str, version: str, tags: Mapping[str, str]) -> bool:
    """True if the version's `scan_seal` matches its verdict tags."""
    return hmac.compare_digest(tags.get("scan_seal", ""), seal(secret, name, version, tags))
