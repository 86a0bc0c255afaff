"""The platform with its real servers (issue 13), started by scripts/scan_services.sh on free
ports with auth on: writes and flow runs without credentials are refused, the flows with them
work, a new registry version reaches Prefect as an event through the signed webhook, and a
browser reads a quarantined version's verdict and lineage in the MLflow UI.

The browser test drives Debian's /usr/bin/chromium through Playwright (`playwright install`
cannot download browsers here); CI installs it (`apt-get install -y chromium`, .ci/run). Where
no browser can be had the test is skipped, saying so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from platform_fixture import FAST, Services, copy_model, free_port, http, make_project

from tasks.common.escape import escape
from tasks.scan.discover import files_key

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    """Prefect, MLflow (basic-auth) and the webhook receiver, as `start servers` starts them."""
    root = tmp_path_factory.mktemp("platform")
    params = make_project(root, {**FAST, "platform.webhook_port": free_port()})
    svc = Services(params, free_port(), free_port())
    started = svc.run("start", "servers")
    try:
        assert started.returncode == 0, started.stdout + started.stderr + svc.logs()
        yield svc
    finally:
        svc.run("stop", timeout=120)


def _python(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])


_UPLOAD = """
import sys
from pathlib import Path
from mlflow import MlflowClient
name, stem = sys.argv[1], sys.argv[2]
c = MlflowClient()
exp = c.get_experiment_by_name("uploads")
exp_id = exp.experiment_id if exp else c.create_experiment("uploads")
run = c.create_run(exp_id)
for s in (".safetensors", ".json"):
    c.log_artifact(run.info.run_id, stem + s, "model")
c.create_registered_model(name)
v = c.create_model_version(name, run.info.artifact_uri + "/model", run_id=run.info.run_id)
c.set_registered_model_alias(name, "current", v.version)
print(v.version)
"""


@pytest.fixture(scope="module")
def quarantined(services: Services, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A version with NaN weights registered through the API, scanned by the real flow."""
    from safetensors.torch import load_file, save_file

    stem = copy_model("clean", tmp_path_factory.mktemp("upload") / "m", "upload")
    tensors = load_file(f"{stem}.safetensors")
    tensors["fc.weight"][0, 0] = float("nan")
    save_file(tensors, f"{stem}.safetensors")
    up = _python(services.client_env(), "-c", _UPLOAD, "uploaded", str(stem))  # publisher
    assert up.returncode == 0, up.stderr
    version = up.stdout.split()[-1]
    done = _python(services.service_env(), "-m", "flows.scan", "model", f"uploaded/{version}",
                   "--params", str(services.params))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"name": "uploaded", "version": version, "flow": done.stdout}


def test_unauthenticated_writes_and_flow_runs_are_refused(services: Services,
                                                         quarantined: dict) -> None:
    creds = services.credentials()
    shown = services.run("status").stdout
    assert f"UI login:   MLflow user '{creds['publisher_user']}' (publisher)" in shown
    for key in ("mlflow_password", "publisher_password", "reader_password"):
        assert creds[key] not in shown  # where it is, not the password itself
    body = {"name": "sneaky"}
    url = f"{services.mlflow}/api/2.0/mlflow/registered-models/create"
    assert http("POST", url, body)[0] == 401
    assert http("POST", url, body, "mesa-admin:wrong")[0] == 401
    tag = {"name": "uploaded", "version": quarantined["version"], "key": "scan_verdict",
           "value": "clean"}
    assert http("POST", f"{services.mlflow}/api/2.0/mlflow/model-versions/set-tag", tag)[0] \
        == 401  # nobody clears a quarantine without credentials
    status, _ = http("POST", url, body, f"{creds['mlflow_user']}:{creds['mlflow_password']}")
    assert status == 200
    assert http("POST", f"{services.prefect}/flow_runs/filter", {})[0] == 401
    assert http("POST", f"{services.prefect}/flow_runs/filter", {}, "mesa:wrong")[0] == 401
    assert http("POST", f"{services.prefect}/flow_runs/filter", {}, creds["prefect_auth"])[0] \
        == 200
    # a flow run with MLflow credentials but without Prefect's is refused by the server
    env = {k: v for k, v in services.service_env().items() if k != "PREFECT_API_AUTH_STRING"}
    refused = _python(env, "-m", "flows.scan", "once", "--params", str(services.params))
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
    # ... and one without MLflow's by MLflow
    env = {k: v for k, v in services.service_env().items() if not k.startswith("MLFLOW_TRACK")}
    env["MLFLOW_TRACKING_URI"] = services.mlflow
    refused = _python(env, "-m", "flows.scan", "once", "--params", str(services.params))
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr


def test_the_flow_with_credentials_quarantines_and_a_new_version_becomes_an_event(
        services: Services, quarantined: dict) -> None:
    assert "'status': 'rejected'" in quarantined["flow"] and "NaN" in quarantined["flow"]
    creds = services.credentials()
    user = f"{creds['mlflow_user']}:{creds['mlflow_password']}"
    _, got = http("GET", f"{services.mlflow}/api/2.0/mlflow/model-versions/get?name=uploaded"
                  f"&version={quarantined['version']}", auth=user)
    version = got["model_version"]
    assert version["aliases"] == ["quarantined"]  # @current was taken away
    assert "REJECTED: quarantined" in version["description"]
    _, model = http("GET", f"{services.mlflow}/api/2.0/mlflow/registered-models/get?name="
                    "uploaded", auth=user)
    tags = {t["key"]: t["value"] for t in model["registered_model"]["tags"]}
    assert tags["scan"] == f"rejected (v{quarantined['version']})"
    # the registry's webhook -> the receiver (HMAC checked) -> a Prefect event
    deadline = time.time() + 60
    while time.time() < deadline:
        _, events = http("POST", f"{services.prefect}/events/filter",
                         {"filter": {"event": {"name": ["mlflow.model_version.created"]}}},
                         creds["prefect_auth"])
        names = [e["resource"].get("mlflow.model.name") for e in events.get("events", [])]
        if "uploaded" in names:
            break
        time.sleep(1)
    assert "uploaded" in names, services.logs()
    assert "emitted" in (services.state / "logs" / "webhook.log").read_text()


def _browser():
    """A Playwright chromium, or pytest.skip saying why there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (bash scripts/setup.sh installs it)")
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing; install Debian's chromium "
                    "(apt-get install -y chromium; CI does, in .ci/run)")
    return sync_playwright


def _launch(pw):
    """Debian's chromium through Playwright, or pytest.skip saying why it does not start."""
    try:
        return pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
    except Exception as err:  # noqa: BLE001 - a browser that cannot start here
        pytest.skip(f"no browser: {CHROMIUM} does not start ({escape(err)[:200]})")


def test_a_browser_reads_the_quarantined_versions_verdict_and_lineage(
        services: Services, quarantined: dict) -> None:
    sync_playwright = _browser()
    creds = services.credentials()
    name, version = quarantined["name"], quarantined["version"]
    with sync_playwright() as pw:
        browser = _launch(pw)
        page = browser.new_context(http_credentials={
            "username": creds["reader_user"], "password": creds["reader_password"]}).new_page()
        page.goto(f"{services.mlflow}/#/models", wait_until="load")
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        listing = page.inner_text("body")
        page.goto(f"{services.mlflow}/#/models/{name}/versions/{version}",
                  wait_until="load")
        page.get_by_text("Scan verdict: REJECTED").first.wait_for(timeout=60_000)
        body = page.inner_text("body")
        browser.close()
    assert name in listing
    assert "quarantined" in body  # the alias and the tag
    assert "Scan verdict: REJECTED: quarantined" in body and "NaN" in body
    assert "parent version: none" in body and "scanner: mesa-pipeline" in body
    assert re.search(r"reference data sha256 [0-9a-f]{16} \(\d+ images of ", body), body
    assert "evidence: scan run" in body and "training data hash" in body
    assert "signature: not signed: verdict rejected" in body


def test_a_backdoored_versions_record_links_its_recovered_trigger(
        services: Services, tmp_path: Path) -> None:
    """The audit record's trigger link is served by the MLflow server the UI runs on."""
    import base64

    from pipeline_fixture import write_scan_params
    from platform_fixture import TUNED

    raw = yaml.safe_load(services.params.read_text())
    tuned = write_scan_params(tmp_path, {**TUNED, "scan.reference": raw["scan"]["reference"],
                                         "scan.state_folder": raw["scan"]["state_folder"]})
    stem = copy_model("backdoored", tmp_path / "up" / "m", "suspect")
    up = _python(services.client_env(), "-c", _UPLOAD, "suspect", str(stem))
    assert up.returncode == 0, up.stderr
    version = up.stdout.split()[-1]
    done = _python(services.service_env(), "-m", "flows.scan", "model", f"suspect/{version}",
                   "--params", str(tuned))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    creds = services.credentials()
    user = f"{creds['reader_user']}:{creds['reader_password']}"  # an auditor's account
    _, got = http("GET", f"{services.mlflow}/api/2.0/mlflow/model-versions/get?name=suspect"
                  f"&version={version}", auth=user)
    text = got["model_version"]["description"]
    assert "BACKDOORED" in text, text
    link = re.search(r"\[evidence/trigger_class_0\.png\]\((get-artifact\?[^)]+)\)", text)
    assert link, text
    req = urllib.request.Request(f"{services.mlflow}/{link.group(1)}")
    req.add_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        assert resp.status == 200 and resp.read(8) == b"\x89PNG\r\n\x1a\n"
    # and in the UI: the rendered record's labelled link opens the PNG, for the reader
    sync_playwright = _browser()
    with sync_playwright() as pw:
        browser = _launch(pw)
        page = browser.new_context(http_credentials={
            "username": creds["reader_user"], "password": creds["reader_password"]}).new_page()
        page.goto(f"{services.mlflow}/#/models/suspect/versions/{version}", wait_until="load")
        anchor = page.get_by_role("link", name="evidence/trigger_class_0.png").first
        anchor.wait_for(timeout=60_000)
        href = anchor.get_attribute("href") or ""
        shown = page.inner_text("body")
        response = page.request.get(href if href.startswith("http") else
                                    f"{services.mlflow}/{href.lstrip('/')}")
        png = response.body()[:8]
        browser.close()
    assert "recovered trigger of class 0" in shown
    assert response.status == 200 and png == b"\x89PNG\r\n\x1a\n", href


_FORGE = """
import json, sys
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
good, good_version, quarantined, q_version, stem = sys.argv[1:6]
c = MlflowClient()
refused = {}
def attempt(label, call):
    try:
        call()
        refused[label] = 0
    except MlflowException as err:
        refused[label] = err.get_http_status_code()
attempt("set a verdict tag", lambda: c.set_model_version_tag(good, good_version, "scan_verdict",
                                                             "backdoored"))
attempt("lift a quarantine", lambda: c.delete_model_version_tag(quarantined, q_version,
                                                                "quarantined"))
attempt("write a scan run", lambda: c.create_run(
    c.get_experiment_by_name("mesa-scan").experiment_id))
attempt("alias a quarantined version", lambda: c.set_registered_model_alias(
    quarantined, "production", q_version))
copied = {k: v for k, v in c.get_model_version(good, good_version).tags.items()
          if k.startswith("scan_")}
exp = c.get_experiment_by_name("uploads").experiment_id
own = c.create_run(exp, tags={"scan_verdict": "clean", "mesa.role": "scan"})
for suffix in (".safetensors", ".json"):
    c.log_artifact(own.info.run_id, stem + suffix, "model")
c.create_registered_model("forged")
source = own.info.artifact_uri + "/model"
copy = c.create_model_version("forged", source, run_id=own.info.run_id, tags=copied)
mine = c.create_model_version("forged", source, run_id=own.info.run_id,
                              tags={**copied, "scan_run_id": own.info.run_id})
c.set_registered_model_alias("forged", "production", copy.version)
print(json.dumps({"refused": refused, "versions": [copy.version, mine.version]}))
"""


def test_a_publisher_cannot_forge_a_verdict_that_survives_the_audit(
        services: Services, quarantined: dict, tmp_path: Path) -> None:
    """The publisher account (what client.env holds) registers models but cannot edit a
    version's tags or write a scan run; verdict tags it puts on new versions of a backdoored
    model (a clean model's real verdict, seal and run copied; or pointing at a run of its own)
    are found by the next audit or the event path: reset, @production removed, scanned for
    real by the service."""
    from pipeline_fixture import write_scan_params
    from platform_fixture import TUNED

    raw = yaml.safe_load(services.params.read_text())
    tuned = write_scan_params(tmp_path, {**TUNED, "scan.reference": raw["scan"]["reference"],
                                         "scan.state_folder": raw["scan"]["state_folder"],
                                         "scan.registry_models": ["forged"]})
    good = copy_model("clean", tmp_path / "good" / "m", "good")
    up = _python(services.client_env(), "-c", _UPLOAD, "good", str(good))
    assert up.returncode == 0, up.stderr
    good_version = up.stdout.split()[-1]
    done = _python(services.service_env(), "-m", "flows.scan", "model",
                   f"good/{good_version}", "--params", str(tuned))
    assert done.returncode == 0 and "'status': 'clean'" in done.stdout, done.stdout[-3000:]

    bad = copy_model("backdoored", tmp_path / "bad" / "m", "forged")
    forged = _python(services.client_env(), "-c", _FORGE, "good", good_version,
                     quarantined["name"], quarantined["version"], str(bad))
    assert forged.returncode == 0, forged.stderr[-3000:]
    result = json.loads(forged.stdout.strip().splitlines()[-1])
    assert result["refused"] == {"set a verdict tag": 403, "lift a quarantine": 403,
                                 "write a scan run": 403, "alias a quarantined version": 403}

    audit = _python(services.service_env(), "-m", "flows.scan", "once", "--params", str(tuned))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    creds = services.credentials()
    reader = f"{creds['reader_user']}:{creds['reader_password']}"
    bad_key = files_key([Path(f"{bad}.safetensors"), Path(f"{bad}.json")])
    _, scans = http("GET", f"{services.mlflow}/api/2.0/mlflow/experiments/get-by-name?"
                    "experiment_name=mesa-scan", auth=reader)
    tampered = {}
    for version in result["versions"]:
        _, got = http("GET", f"{services.mlflow}/api/2.0/mlflow/model-versions/get?name=forged"
                      f"&version={version}", auth=reader)
        tags = {t["key"]: t["value"] for t in got["model_version"].get("tags", [])}
        # Scanned for real: the verdict's run is the service's and scanned exactly these
        # files. Which settings scanned it is a race: the running deployments (FAST, too weak
        # to find this backdoor: 4 steps on 64 images) react to the new versions and poll every
        # minute beside this test's tuned run, and whichever claims a version first scans it
        # (the fresh-clone CI of 2026-12-06 and two runs here saw each win). So the verdict is
        # either, and the version is quarantined exactly when it is backdoored.
        _, run = http("GET", f"{services.mlflow}/api/2.0/mlflow/runs/get?run_id="
                      f"{tags['scan_run_id']}", auth=reader)
        run_tags = {t["key"]: t["value"] for t in run["run"]["data"].get("tags", [])}
        assert run["run"]["info"]["experiment_id"] == scans["experiment"]["experiment_id"], tags
        assert run_tags["scan.files_key"] == bad_key, (run_tags, tags)
        assert tags["scan_verdict"] in ("backdoored", "clean"), tags
        assert (tags.get("quarantined") == "true") == (tags["scan_verdict"] == "backdoored"), tags
        assert tags.get("scan_tampered") and tags.get("scan_seal"), tags
        assert "production" not in got["model_version"].get("aliases", [])
        tampered[version] = tags["scan_tampered"]
    # The reason is read from the version, not from this audit's log: in one CI run the log
    # did not carry it (its findings were empty, the versions already reset by the running
    # deployments' own audit), while the version's own record always does. The seal's reason
    # on the run-of-its-own version was seen once (CI of 2026-12-06 18:08), before checks took
    # the scan's verdict lock (a check reading a rescan between its tags and its seal); that
    # race is tested in tests/test_platform.py, and the reason is still accepted here.
    assert any(why in tampered[result["versions"][1]]
               for why in ("not the scan service's", "do not match the scan service's seal")), \
        tampered


def test_a_model_scanned_locally_is_scanned_for_real_on_the_server(
        services: Services, tmp_path: Path) -> None:
    """`python -m flows.scan model PATH` into a local store, with the service's state folder:
    the same files registered on the server are scanned there (not given the local run's
    verdict), and that verdict holds at the next audit."""
    from pipeline_fixture import write_scan_params

    raw = yaml.safe_load(services.params.read_text())
    params = write_scan_params(tmp_path, {**FAST, "scan.reference": raw["scan"]["reference"],
                                          "scan.state_folder": raw["scan"]["state_folder"],
                                          "scan.registry_models": ["twin"]})
    stem = copy_model("clean", tmp_path / "local" / "m", "twin")
    local = {**services.service_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/local.db"}
    done = _python(local, "-m", "flows.scan", "model", str(stem), "--params", str(params))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    up = _python(services.client_env(), "-c", _UPLOAD, "twin", str(stem))
    assert up.returncode == 0, up.stderr[-2000:]
    version = up.stdout.split()[-1]
    creds = services.credentials()
    reader = f"{creds['reader_user']}:{creds['reader_password']}"
    logs = ""
    for _ in range(3):  # discovery runs, as the poll repeats them (one CI run once saw none)
        once = _python(services.service_env(), "-m", "flows.scan", "once", "--params",
                       str(params))
        assert once.returncode == 0, once.stdout[-3000:] + once.stderr[-3000:]
        logs += once.stdout[-2000:] + once.stderr[-2000:]
        _, got = http("GET", f"{services.mlflow}/api/2.0/mlflow/model-versions/get?name=twin"
                      f"&version={version}", auth=reader)
        tags = {t["key"]: t["value"] for t in got["model_version"].get("tags", [])}
        if "scan_run_id" in tags:
            break
    assert "scan_run_id" in tags, logs
    status, run = http("GET", f"{services.mlflow}/api/2.0/mlflow/runs/get?run_id="
                       f"{tags['scan_run_id']}", auth=reader)
    assert status == 200, tags  # the verdict's run is the server's own scan
    assert run["run"]["data"] and tags["scan_verdict"] in ("clean", "backdoored")
    again = _python(services.service_env(), "-m", "flows.scan", "once", "--params",
                    str(params))
    assert again.returncode == 0 and "unbacked" not in again.stdout + again.stderr


def test_a_replayed_webhook_delivery_gets_409_from_the_running_receiver(
        services: Services) -> None:
    from tasks.scan import webhook

    raw = yaml.safe_load(services.params.read_text())
    url = f"http://127.0.0.1:{raw['platform']['webhook_port']}/webhook"
    body = json.dumps({"entity": "model_version", "action": "created",
                       "data": {"name": "replayed", "version": "1"}}).encode()
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "replay-1",
               "X-MLflow-Timestamp": stamp,
               "X-MLflow-Signature": webhook.signature(
                   services.credentials()["webhook_secret"], "replay-1", stamp, body)}
    codes = []
    for _ in range(2):
        req = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
                codes.append(resp.status)
        except urllib.error.HTTPError as err:
            codes.append(err.code)
    assert codes == [200, 409]
