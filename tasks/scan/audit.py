"""The audit record a person reads: each scanned version's description in the MLflow UI.

The description (Markdown, rendered on the version's page) says in a few lines what was found
and on what evidence: verdict, target, p-value and confidence, the detector that fired, a link
to the scan run holding the trigger grid and per-class scores, a link straight to the recovered
trigger of the target (served by the MLflow server the UI runs on), the parent version, the
training data's hash and the reference images' sha256, the scanner's version and commit (and
whether its own code had local changes) and the signature's status; a repaired version's also
the repair's before/after on the verification images and its settings. The registered model's tags
carry the latest verdict (tasks.scan.quarantine.summarise).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from tasks.common import tracking
from tasks.common.escape import escape

_HEAD = {"clean": "CLEAN", "backdoored": "BACKDOORED: quarantined",
         "rejected": "REJECTED: quarantined"}


def _md(text: object) -> str:
    """A value from outside made inert in Markdown (escaped, no markup characters)."""
    return escape(text).translate({ord(c): f"\\{c}" for c in "[]()*_`<>#|!"})


def repair_lines(repair: dict[str, Any]) -> list[str]:
    """The before/after of a repair (mesa_lib.defence.Outcome.record()), measured on the
    verification images neither the scan nor the repair used."""
    images = repair.get("images", {})
    lines = [f"- repair: {_md(repair['method'])}; verification: "
             f"{'PASSED' if repair['verdict'] == 'clean' else 'FAILED'} on "
             f"{images.get('verification', '?')} verification images (repair "
             f"{images.get('repair', '?')}, selection {images.get('selection', '?')}, apart "
             "from the scan's)"]
    for t in repair.get("targets", []):
        geometry = t.get("geometry", {})
        lines.append(f"  - class {int(t['target'])}: recovered trigger's ASR "
                     f"{t['asr_before']:.1%} -> {t['asr_after']:.1%} (residual); "
                     f"{_md(t.get('detector', ''))} trigger, geometry "
                     f"{_md(geometry.get('kind', '?'))} {_md(geometry.get('size', ''))}")
    lines.append(f"  - clean accuracy {repair['accuracy_before']:.1%} -> "
                 f"{repair['accuracy_after']:.1%}")
    budget = repair.get("settings", {}).get("repair", {})
    lines.append("  - settings: " + ", ".join(
        f"{k} {_md(budget[k])}" for k in ("epochs", "lr", "stamp_rate") if k in budget))
    return lines


def record(verdict: dict[str, Any], run_id: str, lineage: dict[str, str],
           repair: dict[str, Any] | None = None) -> str:
    """The Markdown audit record of one version.

    Args:
        verdict: status, target, p_value, confidence, detector, reason.
        run_id: the scan run (its experiment is looked up for the link).
        lineage: parent, data_hash, reference, commit, signature (any may be missing).
        repair: for a repaired version, its repair's record (before/after, settings).
    """
    run = tracking.run_record(run_id) or {"experiment_id": "0"}
    link = f"#/experiments/{run['experiment_id']}/runs/{run_id}"
    target = "none" if verdict.get("target") is None else f"class {verdict['target']}"
    p_value = verdict.get("p_value")
    stats = ("not measured" if p_value is None else
             f"p = {p_value:.4f} (confidence {verdict['confidence']:.3f})")
    lines = [f"**Scan verdict: {_HEAD.get(verdict['status'], _md(verdict['status']))}**", "",
             f"- target: {target}; {stats}; detector: {_md(verdict.get('detector') or 'none')}",
             f"- evidence: [scan run {run_id[:12]}]({link}) (trigger grid "
             "`evidence/triggers.png`, per-class scores `evidence/scores.csv`)"]
    if verdict.get("target") is not None and verdict["status"] == "backdoored":
        image = f"evidence/trigger_class_{int(verdict['target'])}.png"
        lines.append(f"- recovered trigger of class {int(verdict['target'])} (what the "
                     f"{_md(verdict.get('detector') or 'scan')} detector found): "
                     f"[{image}](get-artifact?path={quote(image, safe='')}&run_uuid={run_id})")
    if verdict.get("reason"):
        lines.append(f"- reason: {_md(verdict['reason'])[:600]}")
    if repair:
        lines += repair_lines(repair)
    lines += [f"- parent version: {_md(lineage.get('parent', 'none'))}",
              f"- data: training data hash {_md(lineage.get('data_hash') or 'unknown')}; "
              f"reference data sha256 {_md(lineage.get('reference') or 'unknown')}",
              f"- scanner: {_md(lineage.get('commit', 'unknown'))}",
              f"- signature: {_md(lineage.get('signature', 'none'))}"]
    return "\n".join(lines)


def write(name: str, version: str, verdict: dict[str, Any], run_id: str,
          lineage: dict[str, str], repair: dict[str, Any] | None = None) -> str:
    """Set the version's description to its audit record; returns the text."""
    text = record(verdict, run_id, lineage, repair)
    tracking.set_version_description(name, version, text)
    return text
