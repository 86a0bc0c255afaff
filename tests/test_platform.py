"""The supply-chain platform without servers (issue 13): the webhook receiver's signature check,
signing and `mesa-scan --verify-signature`, SARIF, the quarantine and registry audit, hostile
names and nesting bombs through the service, killed runs, credentials. Real servers:
tests/test_platform_servers.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import Timeout
from pipeline_fixture import ROOT
from platform_fixture import FAST, copy_model, make_project

from tasks.common import tracking
from tasks.common.params import load_params
from tasks.common.verdicts import seal, verdict_tags
from tasks.scan import audit, auth, quarantine, sarif, service, signing, webhook
from tasks.scan.auth import seal_secret
from tasks.scan.cli import main as mesa_scan
from tasks.scan.discover import files_key


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scan project with a temporary SQLite MLflow store; returns its params path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in auth.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    return make_project(tmp_path, FAST)


# --------------------------------------------------------------------------- webhook receiver


def _signed(secret: str, body: bytes, stamp: str | None = None, delivery: str = "d-1"
            ) -> dict[str, str]:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    stamp = stamp or str(int(time.time()))
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery, stamp, body.decode())}


def test_receiver_emits_an_event_only_for_posts_mlflow_signed() -> None:
    from starlette.testclient import TestClient

    emitted = []
    app = TestClient(webhook.make_app("s3cret", lambda c: emitted.append(
        (c.name, c.version, c.alias)) or "e-1"))
    body = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": "m", "version": "3"}}).encode()
    assert app.post("/webhook", content=body).status_code == 401  # unsigned
    assert app.post("/webhook", content=body, headers=_signed("other", body)).status_code == 401
    stale = _signed("s3cret", body, str(int(time.time()) - 3600))
    assert "timestamp" in app.post("/webhook", content=body, headers=stale).json()["error"]
    forged = body.replace(b'"3"', b'"4"')  # signed body, altered in transit
    assert app.post("/webhook", content=forged, headers=_signed("s3cret", body)).status_code == 401
    assert emitted == []
    ok = app.post("/webhook", content=body, headers=_signed("s3cret", body))
    assert ok.status_code == 200 and ok.json()["version"] == "m/3"
    assert emitted == [("m", "3", "")] and ok.json()["event"] == webhook.EVENT
    moved = json.dumps({"entity": "model_version_alias", "action": "created",
                        "data": {"name": "m", "version": "3", "alias": "production"}}).encode()
    ok = app.post("/webhook", content=moved, headers=_signed("s3cret", moved, delivery="d-4"))
    assert ok.json()["event"] == webhook.ALIAS_EVENT and emitted[-1] == ("m", "3", "production")
    emitted.pop()
    other = json.dumps({"entity": "model_version_tag", "action": "set", "data": {}}).encode()
    assert "ignored" in app.post("/webhook", content=other,
                                 headers=_signed("s3cret", other, delivery="d-2")).json()
    evil = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": "m\n\x1b[2J", "version": "1"}}).encode()
    bad = app.post("/webhook", content=evil, headers=_signed("s3cret", evil, delivery="d-3"))
    assert bad.status_code == 400 and "\\n" in bad.json()["error"] and len(emitted) == 1
    assert app.get("/health").json() == {"status": "ok"}


def test_a_replayed_delivery_gets_409_and_starts_nothing(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    emitted = []
    body = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": "m", "version": "3"}}).encode()
    store = tmp_path / "deliveries.sqlite"
    app = TestClient(webhook.make_app("s3cret", lambda c: emitted.append((c.name, c.version))
                                      or "e", webhook.Deliveries(store)))
    headers = _signed("s3cret", body, delivery="d-9")
    assert app.post("/webhook", content=body, headers=headers).status_code == 200
    again = app.post("/webhook", content=body, headers=headers)  # within the 5-minute window
    assert again.status_code == 409 and "replay" in again.json()["error"]
    # a restarted receiver remembers it too
    restarted = TestClient(webhook.make_app("s3cret", lambda c: emitted.append(
        (c.name, c.version)) or "e", webhook.Deliveries(store)))
    assert restarted.post("/webhook", content=body, headers=headers).status_code == 409
    assert emitted == [("m", "3")]
    # ids are forgotten after twice the window (the timestamp check refuses older posts)
    old = webhook.Deliveries(store)
    assert old.first_time("d-10", now=0.0)
    assert old.first_time("d-10", now=2 * webhook.MAX_SKEW_S + 1)


def test_the_event_trigger_runs_the_scan_of_the_version_the_event_names(project: Path) -> None:
    from tasks.scan.service import event_trigger

    trigger = event_trigger(str(project))
    assert trigger.expect == {webhook.EVENT}
    model = trigger.parameters["model"]
    assert webhook.NAME_LABEL in model and webhook.VERSION_LABEL in model
    assert trigger.parameters["params_path"] == str(project)


# --------------------------------------------------------------------------- signing


def test_a_signed_model_verifies_and_one_altered_byte_is_rejected(project: Path,
                                                                  capsys) -> None:
    params = load_params(project)
    keys = signing.ensure_key(params)
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    assert keys.private.is_relative_to(project.parent / "state")  # never in the repository
    stem = copy_model("clean", project.parent / "ship" / "m")
    sig = signing.sign(stem, Path(f"{stem}.sig"), keys.private)
    assert signing.verify(stem, sig, [keys.public]) == signing.fingerprint(keys.public)
    assert mesa_scan(["--verify-signature", "--params", str(project), str(stem)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    weights = Path(f"{stem}.safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(signing.SignatureError, match=r"m\.sig: signature check failed: "
                       r"m\.safetensors differ"):
        signing.verify(stem, sig, [keys.public])
    assert mesa_scan(["--verify-signature", "--public-key", str(keys.public), "--format",
                      "json", str(stem)]) == 2
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["verdict"] == "rejected" and "altered after signing" in rec["reason"]
    other = project.parent / "other"
    os.environ[signing.KEY_ENV] = str(other / "k.pem")
    try:
        foreign = signing.ensure_key(params)
    finally:
        del os.environ[signing.KEY_ENV]
    fresh = copy_model("clean", project.parent / "ship2" / "m")
    signing.sign(fresh, Path(f"{fresh}.sig"), foreign.private)
    with pytest.raises(signing.SignatureError, match="not signed by any trusted key"):
        signing.verify(fresh, Path(f"{fresh}.sig"), [keys.public])
    assert mesa_scan(["--verify-signature", "--params", str(project),
                      str(project.parent / "ship2" / "none")]) == 2  # no signature at all


def test_verify_signature_works_from_any_folder_and_says_what_is_missing(
        project: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(project.read_text())
    raw["scan"]["state_folder"] = "state-rel"  # relative: to the params file's folder
    params_path = project.parent / "rel.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    keys = signing.ensure_key(load_params(params_path))  # made from the project folder
    stem = copy_model("clean", project.parent / "ship" / "m")
    signing.sign(stem, Path(f"{stem}.sig"), keys.private)
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert mesa_scan(["--verify-signature", "--params", str(params_path), str(stem)]) == 0
    keys.public.unlink()
    assert mesa_scan(["--verify-signature", "--params", str(params_path), str(stem)]) == 3
    err = capsys.readouterr().err
    assert f"{keys.public} not found" in err and "--public-key PEM" in err


def test_signature_mismatches_are_sentences_naming_files_whatever_the_quoting() -> None:
    escaped = "Signature mismatch: ['Hash mismatch for \\'m.safetensors\\': Expected \\'x\\']"
    plain = "Signature mismatch: [\"Hash mismatch for 'm.json': Expected 'x', Actual 'y'\"]"
    files = ("Signature mismatch: [\"Extra files found in model 'model': evil.bin\", "
             "\"Missing files in model 'model': m.json\"]")
    assert signing._why(ValueError(escaped)).startswith("m.safetensors differ(s)")
    assert signing._why(ValueError(plain)).startswith("m.json differ(s)")
    assert signing._why(ValueError(files)) == ("evil.bin not covered by the signature; m.json "
                                               "signed but missing")
    assert signing._why(RuntimeError("raw \x1b[2J")) == "the signature does not verify " \
        "(RuntimeError)"


# --------------------------------------------------------------------------- SARIF, nesting


def test_sarif_log_and_a_nesting_bomb_named_in_its_reason(project: Path, capsys) -> None:
    folder = project.parent / "files"
    folder.mkdir()
    (folder / "evil.safetensors").write_bytes(pickle.dumps({"not": "weights"}))
    shutil.copyfile(ROOT / "tests" / "fixtures" / "scan_models" / "clean.json",
                    folder / "evil.json")
    bomb = copy_model("clean", folder / "bomb")
    Path(f"{bomb}.json").write_text("[" * 200_000 + "]" * 200_000)
    code = mesa_scan([str(folder / "evil"), str(bomb), "--params", str(project), "--reference",
                      str(project.parent / "reference.npz"), "--format", "sarif"])
    log = json.loads(capsys.readouterr().out)
    assert code == 2 and log["version"] == "2.1.0" and "sarif" in log["$schema"]
    (run,) = log["runs"]
    assert run["tool"]["driver"]["name"] == "mesa-scan"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} >= {"MESA001", "MESA002"}
    evil, nested = run["results"]
    assert evil["ruleId"] == "MESA002" and evil["level"] == "error" and evil["kind"] == "fail"
    assert evil["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "evil.safetensors")
    assert "bomb.json" in nested["message"]["text"] and "nests" in nested["message"]["text"]
    assert "recursion" not in json.dumps(log)
    clean = sarif.result({"model": "a/b", "verdict": "clean", "p_value": 0.5, "target": None,
                          "confidence": 0.5, "detector": "mask"})
    assert clean["kind"] == "pass" and clean["level"] == "none"


# --------------------------------------------------------------------------- quarantine, audit


def _version(tmp: Path, name: str, variant: str, alias: str | None = None) -> str:
    stem = copy_model("clean", tmp / "up" / variant / "m", variant)
    run = tracking.start_run("upload", {}, experiment="uploads")
    return tracking.register_model(run, (Path(f"{stem}.safetensors"), Path(f"{stem}.json")),
                                   name, {"scan_verdict": "not scanned"}, "someone's", alias)


def _scan_verdict(name: str, version: str, status: str, params,
                  files_key: str | None = None, settle: bool = True) -> str:
    """What the service does after a scan: a scan run recording the key of the version's
    files (default: exactly its own), the tags, quarantine, seal (`settle`: the last two)."""
    if files_key is None:
        (v,) = [v for v in tracking.model_versions([name]) if v["version"] == version]
        files_key = quarantine.FileKeys(params).of(v)
    run = tracking.start_run(f"scan {name}/{version}", {"mesa.role": "scan",
                                                        "scan_verdict": status,
                                                        "scan.files_key": files_key})
    verdict = {"status": status, "target": 0 if status == "backdoored" else None,
               "confidence": 0.9, "p_value": 0.1, "detector": "mesa", "reason": "test"}
    tags = {**verdict_tags(verdict, run.run_id), "scan_key": "ab" * 32}
    tracking.tag_model_version(name, version, tags)
    if settle:
        quarantine.apply(name, version, tracking.model_version_tags(name, version), params)
    tracking.end_run(run)
    return run.run_id


def test_quarantine_takes_every_alias_and_the_audit_undoes_hand_edits(project: Path) -> None:
    params, tmp = load_params(project), project.parent
    v1 = _version(tmp, "model", "a", alias="current")
    tracking.set_alias("model", "champion", v1)
    v2 = _version(tmp, "model", "b")
    _scan_verdict("model", v1, "backdoored", params)
    assert tracking.model_aliases("model") == {"quarantined": v1}  # @current, @champion gone
    assert tracking.model_version_tags("model", v1)["quarantined"] == "true"
    _scan_verdict("model", v2, "clean", params)
    assert quarantine.audit(params) == []  # scanned verdicts hold
    assert tracking.client().get_registered_model("model").tags["scan"] == f"clean (v{v2})"
    # a summary edited by hand (a publisher may): written again from the versions at the audit
    tracking.set_model_tags("model", {"scan": "clean (v99)", "quarantined": "none"})
    assert quarantine.audit(params) == []
    assert tracking.client().get_registered_model("model").tags["quarantined"] == f"v{v1}"
    # an alias moved onto the quarantined version by hand: a finding, removed
    tracking.set_alias("model", "prod", v1)
    (found,) = quarantine.audit(params)
    assert found["kind"] == "alias-on-quarantined" and "@prod" in found["text"]
    assert tracking.model_aliases("model") == {"quarantined": v1}
    # a verdict edited by hand: detected, quarantined again, marked for a new scan
    tracking.tag_model_version("model", v1, {"scan_verdict": "clean"})
    tracking.set_alias("model", "current", v1)
    (found,) = quarantine.audit(params)
    assert found["kind"] == "unbacked-verdict" and "recorded backdoored" in found["text"]
    assert "@current" in found["text"]
    tags = tracking.model_version_tags("model", v1)
    assert tags["scan_verdict"] == "not scanned" and tags["quarantined"] == "true"
    assert tracking.model_aliases("model") == {"quarantined": v1}
    # a verdict whose run agrees but whose other tags were edited breaks the seal
    tracking.tag_model_version("model", v2, {"scan_target": "3"})
    (found,) = quarantine.audit(params)
    assert "seal" in found["text"]
    lines = (tmp / "state" / "findings.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # a new scan clearing the version lifts the quarantine
    assert tracking.model_aliases("model") == {"quarantined": v2}  # the newest quarantined
    _scan_verdict("model", v1, "clean", params)
    assert "quarantined" not in tracking.model_version_tags("model", v1)
    _scan_verdict("model", v2, "clean", params)
    assert tracking.model_aliases("model") == {}


def test_no_check_reads_a_verdict_between_a_scans_tag_writes(project: Path,
                                                             monkeypatch) -> None:
    """MLflow sets tags one request at a time, so between a scan's verdict tags and its seal the
    version looks edited by hand. The scan holds the model's verdict lock throughout; the audit,
    the alias guard and the event path check under it (the audit skips a version it cannot
    lock until its next run), and none calls the service's own write a forgery."""
    params, tmp = load_params(project), project.parent
    v = _version(tmp, "model", "a")
    _scan_verdict("model", v, "backdoored", params)
    monkeypatch.setattr(quarantine, "LOCK_WAIT", 0.2)
    with quarantine.verdicts_of("model", params):  # a new scan: tags written, not yet sealed
        _scan_verdict("model", v, "clean", params, settle=False)
        tags = tracking.model_version_tags("model", v)
        assert "seal" in quarantine.verdict_backing("model", v, tags, params)  # unlocked: forged
        assert quarantine.audit(params) == []
        tracking.set_alias("model", "current", v)
        with pytest.raises(Timeout):
            quarantine.guard_alias("model", v, "current", params)
        with pytest.raises(Timeout):
            service.event_candidate(f"model/{v}", params)
        assert tracking.model_version_tags("model", v) == tags  # nothing reset meanwhile
        quarantine.apply("model", v, tags, params)  # the seal: the scan's write is complete
    assert quarantine.audit(params) == []
    assert quarantine.guard_alias("model", v, "current", params) is None
    tags = tracking.model_version_tags("model", v)
    assert tags["scan_verdict"] == "clean" and "scan_tampered" not in tags


def test_a_resealed_verdict_of_another_models_scan_is_caught(project: Path) -> None:
    """An insider holding the seal secret copies a clean model's verdict (its real scan run)
    onto a backdoored version, re-seals it and moves @current there: the audit sees that the
    run scanned other files, quarantines the version and marks it for a new scan."""
    params, tmp = load_params(project), project.parent
    good, bad = _version(tmp, "model", "g"), _version(tmp, "model", "h")

    def key(variant: str) -> str:
        return files_key([tmp / "up" / variant / "m.safetensors", tmp / "up" / variant / "m.json"])

    clean_run = _scan_verdict("model", good, "clean", params, key("g"))
    _scan_verdict("model", bad, "backdoored", params, key("h"))
    assert quarantine.audit(params) == []  # each verdict backed by a scan of its own files
    forged = {k: v for k, v in tracking.model_version_tags("model", good).items()
              if k.startswith("scan_") and k != "scan_seal"}
    assert forged["scan_run_id"] == clean_run
    tracking.delete_model_version_tags("model", bad, ("quarantined",))
    tracking.tag_model_version("model", bad, forged)
    tags = tracking.model_version_tags("model", bad)
    tracking.tag_model_version("model", bad, {"scan_seal": seal(seal_secret(params), "model",
                                                                  bad, tags)})
    tracking.set_alias("model", "current", bad)
    (found,) = quarantine.audit(params)
    assert found["kind"] == "unbacked-verdict" and found["version"] == bad
    assert "scanned other files" in found["text"] and "@current" in found["text"]
    assert tracking.model_version_tags("model", bad)["scan_verdict"] == "not scanned"
    assert "current" not in tracking.model_aliases("model")


def test_files_swapped_after_a_clearance_are_found_by_the_next_audit(project: Path) -> None:
    """The publisher owns its upload run and may write its artifacts again after the version
    was cleared: the audit hashes a cleared version's files afresh, finds that its scan run
    scanned other files, quarantines it and marks it for a new scan."""
    params, tmp = load_params(project), project.parent
    v1 = _version(tmp, "model", "s", alias="current")
    _scan_verdict("model", v1, "clean", params)
    assert quarantine.audit(params) == []
    (v,) = [v for v in tracking.model_versions(["model"]) if v["version"] == v1]
    swapped = copy_model("backdoored", tmp / "swap" / "m", "s")
    tracking.client().log_artifact(v["run_id"], f"{swapped}.safetensors", "model")
    (found,) = quarantine.audit(params)
    assert found["kind"] == "unbacked-verdict" and "scanned other files" in found["text"]
    assert tracking.model_version_tags("model", v1)["scan_verdict"] == "not scanned"
    assert "current" not in tracking.model_aliases("model")


def test_no_alias_points_at_a_version_while_it_is_scanned(project: Path) -> None:
    params, tmp = load_params(project), project.parent
    v1 = _version(tmp, "model", "p", alias="current")
    tracking.set_alias("model", "champion", v1)
    assert sorted(quarantine.hold("model", v1)) == ["champion", "current"]
    assert tracking.model_aliases("model") == {}  # scan pending: nothing loads it by alias
    assert tracking.model_version_tags("model", v1)["scan_status"] == "pending"
    _scan_verdict("model", v1, "clean", params)  # cleared: the aliases come back
    assert tracking.model_aliases("model") == {"champion": v1, "current": v1}
    tags = tracking.model_version_tags("model", v1)
    assert tags["scan_status"] == "done" and quarantine.HELD_TAG not in tags
    v2 = _version(tmp, "model", "q", alias="staging")
    quarantine.hold("model", v2)
    _scan_verdict("model", v2, "backdoored", params)  # quarantined: they stay off
    assert "staging" not in tracking.model_aliases("model")
    v3 = _version(tmp, "model", "r", alias="next")
    quarantine.hold("model", v3)
    tracking.set_alias("model", "next", v1)  # someone else took the alias meanwhile
    _scan_verdict("model", v3, "clean", params)
    assert tracking.model_aliases("model")["next"] == v1  # not taken back from v1
    assert quarantine.audit(params) == []


def test_an_alias_the_registry_reports_stands_only_on_a_cleared_version(project: Path) -> None:
    """The event path for aliases (webhook model_version_alias.created -> scan-alias): an alias
    put on a quarantined version is removed, one put on a version no scan has cleared is held
    until a scan clears it; on a cleared version, and the quarantine's own, it stands."""
    params, tmp = load_params(project), project.parent
    good, bad, new = (_version(tmp, "model", v) for v in ("s", "t", "u"))
    _scan_verdict("model", good, "clean", params)
    _scan_verdict("model", bad, "backdoored", params)
    for version in (good, bad, new):
        tracking.set_alias("model", f"prod{version}", version)
    assert quarantine.guard_alias("model", good, f"prod{good}", params) is None
    assert quarantine.guard_alias("model", bad, "quarantined", params) is None
    found = quarantine.guard_alias("model", bad, f"prod{bad}", params)
    assert found["kind"] == "alias-on-quarantined"
    found = quarantine.guard_alias("model", new, f"prod{new}", params)
    assert found["kind"] == "alias-on-unscanned"
    assert tracking.model_aliases("model") == {f"prod{good}": good, "quarantined": bad}
    assert quarantine.guard_alias("model", new, f"prod{new}", params) is None  # gone already
    _scan_verdict("model", new, "clean", params)  # cleared: the held alias comes back
    assert tracking.model_aliases("model")[f"prod{new}"] == new
    logged = (Path(params.scan.state_folder) / "findings.jsonl").read_text()
    assert "alias-on-quarantined" in logged and "alias-on-unscanned" in logged


def test_an_alias_on_a_version_created_with_forged_clean_tags_is_not_trusted(
        project: Path) -> None:
    """A publisher may put any tags on a version it creates: a clean verdict copied from a
    scanned version (run, seal and all) does not let an alias stand, nor skip the scan."""
    from tasks.scan.service import event_candidate

    params, tmp = load_params(project), project.parent
    good = _version(tmp, "model", "v")
    _scan_verdict("model", good, "clean", params)
    copied = {k: v for k, v in tracking.model_version_tags("model", good).items()
              if k.startswith("scan_")}
    forged = _version(tmp, "model", "w")
    tracking.tag_model_version("model", forged, copied)  # as if given at creation
    tracking.set_alias("model", "production", forged)
    found = quarantine.guard_alias("model", forged, "production", params)
    assert found["kind"] == "unbacked-verdict" and "seal" in found["text"]
    assert "production" not in tracking.model_aliases("model")
    assert tracking.model_version_tags("model", forged)["scan_verdict"] == "not scanned"
    again = _version(tmp, "model", "x")
    tracking.tag_model_version("model", again, copied)
    assert event_candidate(f"model/{again}", params) is not None  # scanned, not skipped
    assert tracking.model_version_tags("model", again)["scan_verdict"] == "not scanned"


def test_the_alias_trigger_guards_the_alias_the_event_names(project: Path) -> None:
    from tasks.scan.service import alias_trigger

    trigger = alias_trigger(str(project))
    assert trigger.expect == {webhook.ALIAS_EVENT}
    assert webhook.ALIAS_LABEL in trigger.parameters["alias"]
    assert webhook.NAME_LABEL in trigger.parameters["model"]


def test_the_pipeline_evaluate_verdicts_hold_only_without_accounts(project: Path) -> None:
    """In a one-user store the pipeline's evaluate verdicts hold without a seal; with accounts
    anyone could write such a run, so the same verdict is rescanned by the service."""
    params = load_params(project)
    v = _version(project.parent, "mesa-backdoored", "e", alias="current")
    run = tracking.start_run("evaluate", {"mesa.stage": "evaluate"}, experiment="mesa")
    tracking.log_metrics(run, {"scan": {"backdoored": {"backdoored": 1, "p_value": 0.01}}})
    verdict = {"status": "backdoored", "target": 0, "confidence": 0.99, "p_value": 0.01,
               "detector": "mesa", "reason": ""}
    tracking.tag_model_version("mesa-backdoored", v, verdict_tags(verdict, run.run_id))
    one_user = params.model_copy(update={"platform": params.platform.model_copy(
        update={"auth": False})})
    (found,) = quarantine.audit(one_user)  # backed, but the pipeline left it @current
    assert found["kind"] == "alias-on-quarantined"
    assert tracking.model_version_tags("mesa-backdoored", v)["scan_verdict"] == "backdoored"
    (found,) = quarantine.audit(params)  # platform.auth: true
    assert found["kind"] == "unbacked-verdict" and "not from the scan service" in found["text"]
    assert tracking.model_version_tags("mesa-backdoored", v)["scan_verdict"] == "not scanned"


def test_audit_record_reads_as_a_record_and_quotes_names_inertly(project: Path) -> None:
    run = tracking.start_run("scan x", {})
    text = audit.record({"status": "rejected", "target": None, "p_value": None,
                         "confidence": 1.0, "detector": None,
                         "reason": "m\n[x](javascript:alert(1)): bad"}, run.run_id,
                        {"parent": "none", "data_hash": "abc", "commit": "1234",
                         "signature": "none"})
    assert text.startswith("**Scan verdict: REJECTED: quarantined**")
    assert f"runs/{run.run_id})" in text and "evidence/triggers.png" in text
    assert "\n[x](" not in text and "\\[x\\]" in text and "parent version: none" in text


# --------------------------------------------------------------------------- hygiene


def test_hostile_names_are_escaped_and_a_nesting_bomb_is_named(project: Path,
                                                               caplog) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows import scan as scan_flows

    drop = project.parent / "drop"
    odd = "odd\nname\x1b[2J"
    (drop / f"{odd}.safetensors").write_bytes(pickle.dumps({"x": 1}))
    copy_model("clean", drop / "bomb")
    (drop / "bomb.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with prefect_test_harness(server_startup_timeout=120):
        result = scan_flows.discover_and_scan(params_path=str(project))
    by = {o["label"]: o for o in result["scanned"]}
    assert set(by) == {"drop:odd\\nname\\x1b[2J", "drop:bomb"}
    assert "bomb.json: manifest nests JSON deeper than 64" in by["drop:bomb"]["reason"]
    runs = tracking.client().search_runs([tracking.client().get_experiment_by_name(
        "mesa-scan").experiment_id])
    for run in runs:
        texts = [run.info.run_name, *run.data.tags.values(), *run.data.params.values()]
        assert not any(c in t for t in texts for c in "\n\x1b"), run.info.run_name
    state = service.store_folder(load_params(project))  # this tracking store's records
    records = [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]
    records += [json.loads(p.read_text()) for p in state.glob("done/*.json")]
    assert len(records) == 4 and not any("\n" in s or "\x1b" in s for s in _strings(records))
    assert "\x1b" not in caplog.text


def _strings(value) -> list[str]:
    """Every string (keys too) inside decoded JSON."""
    if isinstance(value, dict):
        return [*value, *(s for v in value.values() for s in _strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


_KILLED = """
import os, signal
from tasks.common import tracking
run = tracking.start_run("scan doomed", {"mesa.role": "scan"})
print(run.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_runs_of_a_killed_process_are_marked_failed_at_the_next_start(project: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == -9, done.stderr
    killed = done.stdout.split()[0]
    alive = tracking.start_run("scan alive", {"mesa.role": "scan"})
    assert tracking.run_record(killed)["status"] == "RUNNING"  # what kill -9 leaves
    assert tracking.fail_orphaned_runs() == [killed]
    rec = tracking.run_record(killed)
    assert rec["status"] == "FAILED" and "killed" in rec["tags"]["mesa.failure"]
    assert tracking.run_record(alive.run_id)["status"] == "RUNNING"  # its process lives


def test_credentials_are_made_once_and_the_environment_wins(tmp_path: Path,
                                                            monkeypatch) -> None:
    for var in auth.ENV.values():
        monkeypatch.delenv(var, raising=False)
    first = auth.credentials(tmp_path)
    path = tmp_path / "auth" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and auth.credentials(tmp_path) == first
    assert first["prefect_auth"].startswith("mesa:") and len(first["mlflow_password"]) >= 24
    monkeypatch.setenv("MESA_MLFLOW_ADMIN_PASSWORD", "from-env")
    assert auth.credentials(tmp_path)["mlflow_password"] == "from-env"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-client-shell")  # client.env sourced
    assert auth.credentials(tmp_path)["mlflow_password"] == "from-env"  # not the admin's
    ini = auth.mlflow_ini(tmp_path, first).read_text()
    assert "auth_cache_ttl_seconds" in ini and "users.db" in ini and "password" not in ini


def test_accounts_replace_an_admin_password_older_clients_held(tmp_path: Path, monkeypatch,
                                                               project: Path) -> None:
    """Upgrading a credentials file from before the accounts: `accounts` signs in with the old
    admin password, sets the new one, and the file forgets the old one."""
    import mlflow.server.auth.client as mac

    for var in auth.ENV.values():
        monkeypatch.delenv(var, raising=False)
    params = load_params(project)
    state = auth.state_folder(params)
    old = {k: v for k, v in auth.credentials(state).items() if "publisher" not in k
           and "reader" not in k}
    (state / "auth" / auth.FILE).write_text(json.dumps(old))
    creds = auth.credentials(state)
    calls = []

    class Admin:
        def __init__(self, uri: str) -> None:
            self.who = os.environ["MLFLOW_TRACKING_PASSWORD"]

        def update_user_password(self, user: str, password: str) -> None:
            calls.append((self.who, user, password))

    monkeypatch.setattr(mac, "AuthServiceClient", Admin)
    done = auth._rotate_admin("http://x", creds, state)
    assert calls == [(old["mlflow_password"], creds["mlflow_user"], creds["mlflow_password"])]
    assert "replaced" in done[0] and auth.PREVIOUS not in auth.credentials(state)
    assert auth._rotate_admin("http://x", auth.credentials(state), state) == []


def test_the_client_env_holds_no_service_secret(project: Path) -> None:
    """What clients `source` (client.env) lets them call MLflow and Prefect, never seal a
    verdict, sign a webhook or read MLflow's stored webhook secrets."""
    params = load_params(project)
    client = auth.shell_env(params)
    reader = auth.shell_env(params, "reader")
    server = auth.shell_env(params, "server")
    creds = auth.credentials(auth.state_folder(params))
    for key in ("seal_secret", "webhook_secret", "flask_secret", "webhook_key",
                "mlflow_password"):
        assert creds[key] not in client and creds[key] not in reader and creds[key] in server, key
    assert f"MLFLOW_TRACKING_USERNAME={creds['publisher_user']}" in client
    assert f"MLFLOW_TRACKING_PASSWORD={creds['publisher_password']}" in client
    assert f"MLFLOW_TRACKING_USERNAME={creds['reader_user']}" in reader
    for shell in (client, reader):  # Prefect OSS has one all-powerful auth string
        assert creds["prefect_auth"] not in shell
    assert f"MLFLOW_TRACKING_USERNAME={creds['mlflow_user']}" in server


def test_an_older_credentials_file_gains_the_new_accounts(tmp_path: Path, monkeypatch) -> None:
    for var in auth.ENV.values():
        monkeypatch.delenv(var, raising=False)
    old = {k: v for k, v in auth.credentials(tmp_path).items() if "publisher" not in k
           and "reader" not in k}
    path = tmp_path / "auth" / "credentials.json"
    path.write_text(json.dumps(old))
    now = auth.credentials(tmp_path)
    kept = {k: v for k, v in old.items() if k != "mlflow_password"}
    assert {k: now[k] for k in kept} == kept and now["publisher_user"] == "mesa-publisher"
    # the old client.env handed out the admin's password: a new one is due on the server
    assert now[auth.PREVIOUS] == old["mlflow_password"] != now["mlflow_password"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and auth.credentials(tmp_path) == now
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="credentials.json: not a JSON object"):
        auth.credentials(tmp_path)
