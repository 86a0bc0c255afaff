"""`mesa-scan --format sarif`: verdict records as a SARIF 2.1.0 log for code-scanning UIs.

One run of the tool `mesa-scan`; one result per model: `fail` (level error) for a backdoor,
`fail` (level error) for a file refused as unsafe, `open` (level warning) for a scan that could
not finish or a model outside the calibration (no verdict), `pass` (level none) for a clean
model. Each result points at the model's
`.safetensors` file (relative to the working folder where possible) and carries the p-value,
target, detector and confidence as properties.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mesa_lib import modelfiles

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULES = {
    "backdoored": ("MESA001", "backdoor", "A class of the model is hijacked by a trigger "
                   "(calibrated p-value below the scanner's alpha)."),
    "rejected": ("MESA002", "unsafe-file", "The model file was refused before loading "
                 "(pickle, bad shapes, NaN, oversize, bad manifest or signature)."),
    "error": ("MESA003", "scan-error", "The scan could not finish."),
    "clean": ("MESA000", "clean", "No backdoor found."),
    "uncalibrated": ("MESA004", "uncalibrated", "The model is outside what the scanner is "
                     "calibrated on (architecture, input shape, class count): no verdict."),
}
LEVEL = {"backdoored": ("error", "fail"), "rejected": ("error", "fail"),
         "error": ("warning", "open"), "clean": ("none", "pass"),
         "uncalibrated": ("warning", "open")}


def _uri(model: str) -> str:
    path = modelfiles.main_file(model)
    try:
        return Path(os.path.relpath(path)).as_posix()
    except ValueError:
        return path.as_posix()


def _message(rec: dict[str, Any]) -> str:
    if rec["verdict"] == "backdoored":
        return (f"Backdoor found: target class {rec['target']}, p = {rec['p_value']:.4f} "
                f"({rec['detector']} detector). {rec.get('reason') or ''}").strip()
    if rec["verdict"] == "clean":
        return f"Clean: p = {rec['p_value']:.4f} (no class is hijacked)."
    return f"{rec['verdict'].capitalize()}: {rec.get('reason') or 'no reason given'}"


def result(rec: dict[str, Any]) -> dict[str, Any]:
    """One SARIF result of a verdict record (tasks.scan.core.record)."""
    rule_id = RULES[rec["verdict"]][0]
    level, kind = LEVEL[rec["verdict"]]
    return {"ruleId": rule_id, "ruleIndex": list(RULES).index(rec["verdict"]), "level": level,
            "kind": kind, "message": {"text": _message(rec)},
            "locations": [{"physicalLocation": {"artifactLocation": {
                "uri": _uri(rec["model"])}}}],
            "properties": {k: rec.get(k) for k in ("verdict", "target", "p_value", "confidence",
                                                   "detector")}}


def log(records: list[dict[str, Any]], version: str) -> dict[str, Any]:
    """The SARIF 2.1.0 log of one mesa-scan invocation."""
    rules = [{"id": rid, "name": name, "shortDescription": {"text": text},
              "defaultConfiguration": {"level": LEVEL[v][0]}}
             for v, (rid, name, text) in RULES.items()]
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": [{
        "tool": {"driver": {"name": "mesa-scan", "version": version,
                            "rules": rules}},
        "results": [result(r) for r in records]}]}
