"""The one tag format of a scan verdict on a registered model version.

Used by the pipeline's `evaluate` stage and by the scan service alike, so a person auditing the
registry reads every verdict the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tasks.common.escape import escape

TAG_LIMIT = 4000  # registry tag values are limited in length


def verdict_tags(verdict: dict[str, Any], run_id: str) -> dict[str, str]:
    """The tags a scan verdict {status, target, confidence, p_value, detector, reason} puts on
    a model version.

    `scan_verdict` is clean | backdoored | rejected (or "not scanned" at registration); a
    backdoored model is also tagged `quarantined`. The reason is escaped (it may quote names
    from outside).
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
    if verdict["status"] == "backdoored":
        tags["quarantined"] = "true"
    return tags
