"""Register -> verdict latency of the scan platform: the event path against the poll path.

Usage:
    .venv/bin/python benchmarks/scan_latency.py                    # event run, then 2 poll runs
    .venv/bin/python benchmarks/scan_latency.py --poll-runs 0      # the event path only

What it does (docs/scanning.md, "The supply-chain platform"):
1. Event path: a scratch project (tests/platform_fixture.py `make_project`, the detection
   settings TUNED, a plumbing calibration, `scan.interval_s` 600) and its servers started by
   `bash scripts/scan_services.sh start` (auth on, OMP_NUM_THREADS=1). Registers
   tests/fixtures/scan_models/backdoored.* and then clean.* (copies made unique, so no verdict
   is reused) through the MLflow client (a run's `model/` folder, `create_model_version`,
   alias `@current`), with the credentials of the state folder's `auth/client.env`, and polls
   `get_model_version` every 0.5 s until the version carries its seal (`scan_seal`) and audit
   record (description). Then the signed clean version, one byte altered, is registered again
   (it must be rejected). Each registration waits until no flow run is pending or running
   (the last one is still ending when its verdict settles).
2. Poll path: a second scratch project with `scan.interval_s` 60 whose webhook receiver is
   stopped after the start; `--poll-runs` registrations of backdoored.*. Their wait for the
   next discovery run depends on where in the period they fall (0-60 s).
3. Each time runs from just before `create_model_version` to the settled verdict. It is split
   into the scan (check + fit: the scan run's `seconds.check` + `seconds.fit_max` metrics in
   MLflow), the recording (`seconds.record`) and the rest (webhook, event, trigger, the flow
   run's process start and imports, fetching the version; on the poll path the wait for the
   next discovery run). Which flow scanned the version is read from its claim's owner.
4. Checks: backdoored ends with only `@quarantined`, clean is cleared and signed, the altered
   one is rejected and quarantined, and each was scanned by the path measured.

Writes benchmarks/results/scan_latency.md (`--out`): command, date, CPU cores, load average
before and after each measurement, the table. The services are always stopped at the end. Exits
non-zero, saying why, if a service does not come up, a verdict does not arrive within
`--timeout` or a check fails (the report is written all the same).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the platform tests' fixture helpers

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from platform_fixture import TUNED, Services, copy_model, http, make_project  # noqa: E402

from tasks.common.tracking import git_state  # noqa: E402
from tasks.common.verdicts import QUARANTINE_ALIAS  # noqa: E402
from tasks.scan.claims import ClaimStore  # noqa: E402
from tasks.scan.discover import SIGNATURE_SUFFIX  # noqa: E402

EVENT_INTERVAL_S = 600  # the poll stays out of the way of the event path
POLL_INTERVAL_S = 60  # params.yaml's default
POLL_S = 0.5  # how often the client asks for the version
FLOW_PATH = {"scan-event": "event", "scan-discover": "poll"}


class BenchError(RuntimeError):
    """A service that did not come up, a verdict that did not arrive."""


@dataclass
class Row:
    """One registration and what became of it."""

    path: str  # event | poll
    model: str  # what was registered, as the table says it
    expect: str  # the verdict it must get
    name: str = ""
    version: str = ""
    verdict: str = ""
    aliases: list[str] = field(default_factory=list)
    total: float = 0.0
    scan: float | None = None
    record: float | None = None
    via: str = "?"
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    problems: list[str] = field(default_factory=list)

    @property
    def rest(self) -> float | None:
        """Register -> verdict minus scan and record."""
        if self.scan is None:
            return None
        return self.total - self.scan - (self.record or 0.0)


# --------------------------------------------------------------------------- services


def project(root: Path, name: str, webhook_port: int, interval_s: int) -> Path:
    """A scratch scan project under `root`/`name` (its own state folder); its params file."""
    return make_project(root / name, {**TUNED, "platform.webhook_port": webhook_port,
                                      "platform.auth": True, "platform.runner_poll_s": 1,
                                      "scan.interval_s": interval_s})


def services(params: Path, args: argparse.Namespace) -> Services:
    """scripts/scan_services.sh for `params` on the ports of the command line."""
    svc = Services(params, args.prefect_port, args.mlflow_port)
    svc.env["OMP_NUM_THREADS"] = "1"
    return svc


def control(svc: Services, command: str, timeout: float) -> str:
    """`scan_services.sh <command>`; its output, or BenchError with the logs if it fails."""
    try:
        done = svc.run(command, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"scan_services.sh {command} took over {timeout:.0f} s\n"
                         f"{svc.logs()}") from None
    if done.returncode != 0:
        raise BenchError(f"scan_services.sh {command} failed (exit {done.returncode}):\n"
                         f"{done.stdout}{done.stderr}\n{svc.logs()}")
    return done.stdout


def stop(svc: Services) -> None:
    """Stop every service of `svc`; a failure to stop is reported, not raised."""
    try:
        print(control(svc, "stop", 180), end="", flush=True)
    except BenchError as err:
        print(f"warning: {err}", file=sys.stderr)


def prefect_list(svc: Services, auth: str, what: str, body: dict) -> list[dict]:
    """POST /api/<what>/filter on the project's Prefect server."""
    status, got = http("POST", f"{svc.prefect}/{what}/filter", body, auth)
    if status != 200 or not isinstance(got, list):
        raise BenchError(f"Prefect {what}/filter answered {status}: {str(got)[:300]}")
    return got


def wait_idle(svc: Services, auth: str, timeout: float, ahead_s: float = 0.0) -> float:
    """Wait until both deployments and the event trigger are served and no flow run is pending
    or running (nor, with `ahead_s`, scheduled to start within `ahead_s`), for `ahead_s` (at
    least 1) seconds in a row: after the start, between measurements (the last flow run is
    still finishing when its verdict settles) and before the stop. The seconds waited."""
    start, quiet_since = time.perf_counter(), None
    while time.perf_counter() - start < timeout:
        names = {d["name"] for d in prefect_list(svc, auth, "deployments", {})}
        triggers = prefect_list(svc, auth, "automations", {})
        busy = prefect_list(svc, auth, "flow_runs", {"flow_runs": {"state": {"type": {
            "any_": ["PENDING", "RUNNING", "CANCELLING"]}}}})
        if ahead_s:
            soon = (datetime.now(UTC) + timedelta(seconds=ahead_s)).isoformat()
            busy += prefect_list(svc, auth, "flow_runs", {"flow_runs": {
                "state": {"type": {"any_": ["SCHEDULED"]}},
                "expected_start_time": {"before_": soon}}})
        if not ({"scan-new-models", "scan-on-event"} <= names and triggers) or busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.perf_counter()
        elif time.perf_counter() - quiet_since >= max(ahead_s, 1.0):
            return time.perf_counter() - start
        time.sleep(1)
    raise BenchError(f"the deployments were not served and idle within {timeout:.0f} s\n"
                     f"{svc.logs()}")


def stop_receiver(svc: Services) -> None:
    """End the webhook receiver's process group (the poll path: no events)."""
    pid = int((svc.state / "run" / "webhook.pid").read_text())
    os.killpg(pid, signal.SIGTERM)  # launched with setsid: its pid is its group's
    for _ in range(40):
        try:  # gone, or a zombie nobody has reaped yet
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.5)
    raise BenchError(f"the webhook receiver (pid {pid}) did not stop")


def connect(svc: Services) -> tuple[MlflowClient, str]:
    """An MLflow client with the credentials of the state folder's auth/client.env, and the
    Prefect auth string."""
    env = {}
    for line in (svc.state / "auth" / "client.env").read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            key, _, value = words[1].partition("=")
            env[key] = value
    os.environ["MLFLOW_TRACKING_USERNAME"] = env["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_TRACKING_PASSWORD"]
    return MlflowClient(tracking_uri=svc.mlflow), env["PREFECT_API_AUTH_STRING"]


# --------------------------------------------------------------------------- one measurement


def register(client: MlflowClient, name: str, stem: Path) -> tuple[str, float]:
    """Log `stem`.* to a run's `model/`, register it as a version of `name` and point
    `@current` at it; (version, perf_counter just before `create_model_version`)."""
    exp = client.get_experiment_by_name("uploads")
    run = client.create_run(exp.experiment_id if exp else client.create_experiment("uploads"))
    for path in sorted(stem.parent.glob(stem.name + ".*")):
        client.log_artifact(run.info.run_id, str(path), "model")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    t0 = time.perf_counter()
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "current", version)
    return str(version), t0


def wait_verdict(client: MlflowClient, svc: Services, name: str, version: str, t0: float,
                 timeout: float) -> tuple[float, ModelVersion, dict[str, str]]:
    """Poll the version until it is sealed and has its audit record: (seconds since `t0`, the
    version, owner of each claim seen meanwhile by key)."""
    store = ClaimStore(svc.state)
    owners: dict[str, str] = {}
    while True:
        for claim in store.claims.glob("*.claim"):
            try:
                owners[claim.name.removesuffix(".claim")] = json.loads(claim.read_text())["owner"]
            except (OSError, ValueError, KeyError):
                pass  # gone or half-written: the next poll
        mv = client.get_model_version(name, version)
        if mv.tags.get("scan_seal") and (mv.description or "").startswith("**Scan verdict"):
            return time.perf_counter() - t0, mv, owners
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"{name}/{version}: no verdict after {timeout:.0f} s (tags "
                             f"{sorted(mv.tags)})\n{svc.logs()}")
        time.sleep(POLL_S)


def scan_seconds(client: MlflowClient, run_id: str) -> tuple[float, float | None]:
    """(check + fit, record) seconds of a scan run; `seconds.record` is logged just after the
    version settles, so it is waited for a little."""
    for _ in range(20):
        metrics = client.get_run(run_id).data.metrics
        if "seconds.record" in metrics:
            break
        time.sleep(0.5)
    scan = metrics.get("seconds.check", 0.0) + metrics.get("seconds.fit_max", 0.0)
    return scan, metrics.get("seconds.record")


def scanned_by(svc: Services, auth: str, owner: str | None) -> str:
    """`event` or `poll`: the path of the flow run that claimed the version."""
    if not owner:
        return "?"
    status, run = http("GET", f"{svc.prefect}/flow_runs/{owner}", auth=auth)
    if status != 200:
        return "?"
    status, flow = http("GET", f"{svc.prefect}/flows/{run['flow_id']}", auth=auth)
    return FLOW_PATH.get(flow.get("name"), flow.get("name", "?")) if status == 200 else "?"


def check(row: Row, mv: ModelVersion) -> list[str]:
    """What is wrong with the settled version, given the verdict it must get."""
    problems = []
    if row.verdict != row.expect:
        problems.append(f"verdict {row.verdict}, expected {row.expect}")
    if row.expect == "clean":
        if QUARANTINE_ALIAS in row.aliases or mv.tags.get("quarantined") == "true":
            problems.append("clean but quarantined")
        if "signed by key" not in mv.tags.get("signature", ""):
            problems.append(f"not signed ({mv.tags.get('signature', 'no signature tag')})")
    elif row.aliases != [QUARANTINE_ALIAS] or mv.tags.get("quarantined") != "true":
        problems.append(f"aliases {row.aliases}, expected only @{QUARANTINE_ALIAS}")
    if row.via != row.path:
        problems.append(f"scanned by the {row.via} path")
    return problems


def measure(client: MlflowClient, svc: Services, auth: str, row: Row, stem: Path,
            timeout: float) -> Row:
    """Register `stem` as a version of `row.name` once the flow runs are idle, wait for its
    verdict, fill `row`."""
    wait_idle(svc, auth, timeout)
    row.load_before = os.getloadavg()
    row.version, t0 = register(client, row.name, stem)
    row.total, mv, owners = wait_verdict(client, svc, row.name, row.version, t0, timeout)
    row.load_after = os.getloadavg()
    row.verdict, row.aliases = mv.tags.get("scan_verdict", ""), sorted(mv.aliases)
    row.scan, row.record = scan_seconds(client, mv.tags["scan_run_id"])
    row.via = scanned_by(svc, auth, owners.get(mv.tags.get("scan_key", "")))
    row.problems = check(row, mv)
    print(f"{row.path:5} {row.model}: {row.name}/{row.version} {row.verdict} "
          f"{row.aliases} in {row.total:.1f} s (scan {row.scan:.1f} s, by {row.via}; load "
          f"{row.load_before[0]:.2f} -> {row.load_after[0]:.2f})"
          + (f"  PROBLEM: {'; '.join(row.problems)}" if row.problems else ""), flush=True)
    return row


def altered_copy(client: MlflowClient, name: str, version: str, dst: Path) -> Path:
    """The files of a signed version (with its `.sig`), one byte of the weights flipped."""
    mv = client.get_model_version(name, version)
    folder = Path(client.download_artifacts(mv.run_id, "model", str(dst)))
    weights = next(folder.glob("*.safetensors"))
    if not weights.with_suffix(SIGNATURE_SUFFIX).is_file():
        raise BenchError(f"{name}/{version} carries no signature in {mv.source}")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    return weights.with_suffix("")


# --------------------------------------------------------------------------- the two paths


def start(svc: Services, args: argparse.Namespace) -> tuple[MlflowClient, str]:
    """Start the services; (client, auth) once the deployments are served and idle."""
    print(control(svc, "start", args.start_timeout), end="", flush=True)
    client, auth = connect(svc)
    waited = wait_idle(svc, auth, args.start_timeout, ahead_s=5)
    print(f"deployments served and idle after {waited:.0f} s more", flush=True)
    return client, auth


def event_path(args: argparse.Namespace, root: Path, rows: list[Row]) -> None:
    """Backdoored, clean and the altered signed clean one, each scanned on its event."""
    svc = services(project(root, "event", args.webhook_port, EVENT_INTERVAL_S), args)
    try:
        client, auth = start(svc, args)
        for source, label in (("backdoored", "backdoored -> quarantined"),
                              ("clean", "clean -> signed")):
            stem = copy_model(source, root / "upload" / f"{source}-event", "event")
            rows.append(measure(client, svc, auth, Row("event", label, source,
                                                       f"latency-{source}"), stem, args.timeout))
        stem = altered_copy(client, "latency-clean", rows[-1].version, root / "upload" / "altered")
        rows.append(measure(client, svc, auth, Row(
            "event", "the signed clean one, 1 byte altered, re-registered -> rejected",
            "rejected", "latency-clean"), stem, args.timeout))
        wait_idle(svc, auth, args.timeout)  # the last flow run ends before the stop
    finally:
        stop(svc)


def poll_path(args: argparse.Namespace, root: Path, rows: list[Row]) -> None:
    """`--poll-runs` backdoored copies, found by the discovery run (receiver stopped)."""
    svc = services(project(root, "poll", args.webhook_port, POLL_INTERVAL_S), args)
    try:
        client, auth = start(svc, args)
        stop_receiver(svc)
        for k in range(1, args.poll_runs + 1):
            stem = copy_model("backdoored", root / "upload" / f"backdoored-poll{k}", f"poll{k}")
            rows.append(measure(client, svc, auth, Row(
                "poll", f"backdoored -> quarantined (`scan.interval_s {POLL_INTERVAL_S}`)",
                "backdoored", "latency-backdoored"), stem, args.timeout))
        wait_idle(svc, auth, args.timeout)
    finally:
        stop(svc)


# --------------------------------------------------------------------------- report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def report(args: argparse.Namespace, rows: list[Row], started: datetime,
           loads: tuple[tuple[float, ...], tuple[float, ...]], error: str) -> str:
    """The results as Markdown."""
    exe = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) \
        else sys.executable
    commit, dirty = git_state()
    load = " / ".join(f"{x:.2f}" for x in loads[0]), " / ".join(f"{x:.2f}" for x in loads[1])
    lines = [
        f"### Register -> verdict, event vs poll ({started:%Y-%m-%d})", "",
        f"- command: `{shlex.join([exe, *sys.argv])}`",
        f"- date: {started.isoformat(timespec='seconds')} to "
        f"{datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable); load "
        f"average (1 / 5 / 15 min) {load[0]} at the start, {load[1]} at the end",
        f"- code: {commit[:12]}{' (uncommitted changes)' if dirty else ''}",
        f"- settings: tests/platform_fixture.py TUNED detection settings, plumbing calibration,"
        f" auth on, `platform.runner_poll_s 1`, OMP_NUM_THREADS=1, ports {args.prefect_port} /"
        f" {args.mlflow_port} / {args.webhook_port}; event path `scan.interval_s "
        f"{EVENT_INTERVAL_S}`, poll path `scan.interval_s {POLL_INTERVAL_S}` with the receiver"
        " stopped",
        "- times: from just before `create_model_version` to the version carrying its verdict,"
        f" seal, aliases and audit record (polled every {POLL_S} s); scan = the scan run's "
        "`seconds.check + seconds.fit_max`, record = `seconds.record`, rest = the remainder",
        "",
        "| path | model | version | verdict, aliases | register -> settled verdict "
        "| scan (check + fit) | record | rest | load (1 min) before -> after | scanned by "
        "| check |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        aliases = ", ".join("@" + a for a in r.aliases) or "no alias"
        lines.append(
            f"| {r.path} | {r.model} | {r.name}/{r.version} | {r.verdict}, {aliases} "
            f"| {_s(r.total)} | {_s(r.scan)} | {_s(r.record)} | {_s(r.rest)} "
            f"| {r.load_before[0]:.2f} -> {r.load_after[0]:.2f} | {r.via} "
            f"| {'; '.join(r.problems) or 'ok'} |")
    if error:
        lines += ["", f"**The run failed:** {error.splitlines()[0]}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: measure both paths, write the report, exit non-zero on any failure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefect-port", type=int, default=4311)
    ap.add_argument("--mlflow-port", type=int, default=5311)
    ap.add_argument("--webhook-port", type=int, default=5151)
    ap.add_argument("--poll-runs", type=int, default=2, help="poll-path repeats (0: none)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds a verdict may take before the run fails")
    ap.add_argument("--start-timeout", type=float, default=600,
                    help="seconds the services may take to come up")
    ap.add_argument("--workdir", type=Path, help="scratch projects (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scan_latency.md")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # the finally blocks run
    os.environ |= {"MLFLOW_DISABLE_TELEMETRY": "true",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="scan_latency-"))).resolve()
    started, load_start = datetime.now().astimezone(), os.getloadavg()
    rows: list[Row] = []
    error = ""
    try:
        event_path(args, root, rows)
        if args.poll_runs > 0:
            poll_path(args, root, rows)
    except Exception as err:  # reported, then the run exits non-zero
        if not isinstance(err, BenchError):
            traceback.print_exc()
        error = f"{type(err).__name__}: {err}"
    text = report(args, rows, started, (load_start, os.getloadavg()), error)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\n{text}\nwritten to {args.out}")
    failed = [f"{r.name}/{r.version}: {'; '.join(r.problems)}" for r in rows if r.problems]
    if error or failed:
        print(f"scratch projects and logs kept in {root}", file=sys.stderr)
        sys.exit(f"error: {error}" if error else f"error: checks failed: {' | '.join(failed)}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
