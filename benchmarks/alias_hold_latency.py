"""How long an alias stands on a version nobody has scanned yet, or on a quarantined one
(issue 23: scan pending, and the event path for aliases).

    .venv/bin/python benchmarks/alias_hold_latency.py [--models 5] \
        > benchmarks/results/alias_hold_latency.md

Starts the whole platform (scripts/scan_services.sh start: Prefect, MLflow with basic auth, the
webhook receiver and both deployments) on free ports in a temporary folder, then registers
models through the API as a client does (`@current` set right after the version is created)
and measures, per version, the seconds from the alias being set until the service has taken it
off (the registry webhook -> Prefect event -> `scan-event` run -> `quarantine.hold`), and
from then until the version has a verdict. The poll (every `scan.interval_s`) is the backstop;
whichever path comes first holds the alias. The models are the tests' tiny clean ResNet-8 (the
verdict does not matter here). Then, per model, a version whose weights hold a NaN (rejected,
so quarantined) gets `@production` from the client, and the seconds until the service took it
off are measured (webhook `model_version_alias.created` -> Prefect event -> `scan-alias`). The
client is the publisher account of `client.env`, as a user's would be. Nothing else should run
while it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from platform_fixture import FAST, Services, copy_model, free_port, make_project  # noqa: E402


def _client(services: Services):
    from mlflow import MlflowClient

    creds = services.credentials()
    os.environ.update({"MLFLOW_TRACKING_USERNAME": creds["publisher_user"],
                       "MLFLOW_TRACKING_PASSWORD": creds["publisher_password"]})
    return MlflowClient(tracking_uri=services.mlflow)


def _register(c, name: str, stem: Path) -> str:
    exp = c.get_experiment_by_name("uploads")
    run = c.create_run(exp.experiment_id if exp else c.create_experiment("uploads"))
    for suffix in (".safetensors", ".json"):
        c.log_artifact(run.info.run_id, f"{stem}{suffix}", "model")
    try:
        c.get_registered_model(name)
    except Exception:  # noqa: BLE001 - first version
        c.create_registered_model(name)
    v = c.create_model_version(name, run.info.artifact_uri + "/model", run_id=run.info.run_id)
    c.set_registered_model_alias(name, "current", v.version)
    return str(v.version)


def _until(check, timeout: float = 300.0, step: float = 0.2) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if check():
            return time.perf_counter() - start
        time.sleep(step)
    return None


def _moved_onto_quarantined(c, root: Path, i: int) -> tuple[str, str, float | str | None]:
    """A NaN-weight version (rejected, quarantined), then `@production` put on it by the
    client: (version, verdict, seconds until the alias was gone, or "refused (403)" when the
    server's `mesa-auth` app refused to set it)."""
    from mlflow.exceptions import MlflowException
    from safetensors.torch import load_file, save_file

    stem = copy_model("clean", root / "nan" / str(i) / "m", f"nan{i}")
    tensors = load_file(f"{stem}.safetensors")
    tensors["fc.weight"][0, 0] = float("nan")
    save_file(tensors, f"{stem}.safetensors")
    version = _register(c, "quarantine-latency", stem)
    tags = lambda: c.get_model_version("quarantine-latency", version).tags  # noqa: E731
    _until(lambda: tags().get("quarantined") == "true" and tags().get("scan_seal"))
    time.sleep(2)  # the quarantine's own steps are over: only the event path can act now
    try:
        c.set_registered_model_alias("quarantine-latency", "production", version)
    except MlflowException as err:
        if err.get_http_status_code() != 403:
            raise
        return version, tags().get("scan_verdict", "none"), "refused (403)"
    removed = _until(lambda: "production" not in c.get_registered_model(
        "quarantine-latency").aliases, step=0.1)
    return version, tags().get("scan_verdict", "none"), removed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="alias-latency-") as tmp:
        root = Path(tmp)
        params = make_project(root, {**FAST, "platform.webhook_port": free_port()})
        services = Services(params, free_port(), free_port())
        started = services.run("start", timeout=600)
        if started.returncode != 0:
            sys.exit(started.stdout + started.stderr + services.logs())
        rows, moved = [], []
        try:
            c = _client(services)
            for i in range(args.models):
                stem = copy_model("clean", root / "up" / str(i) / "m", f"latency{i}")
                version = _register(c, "latency", stem)
                held = _until(lambda v=version: c.get_model_version("latency", v).aliases == []
                              or "current" not in c.get_model_version("latency", v).aliases)
                tags = lambda v=version: c.get_model_version("latency", v).tags  # noqa: E731
                verdict = _until(lambda t=tags: t().get("scan_verdict") in
                                 ("clean", "backdoored", "rejected"))
                rows.append((version, held, verdict, tags().get("scan_verdict", "none")))
            for i in range(args.models):
                moved.append(_moved_onto_quarantined(c, root, i))
        finally:
            services.run("stop", timeout=120)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    print("# Alias on an unscanned version: how long it stands\n")
    print(f"- command: `.venv/bin/python benchmarks/alias_hold_latency.py --models {args.models}`"
          f" (commit {commit})")
    print(f"- machine: {os.cpu_count()} cores; load average before the run {load[0]:.2f} / "
          f"{load[1]:.2f} / {load[2]:.2f}")
    print("- seconds from `@current` being set on a new version until the service took it off "
          "(scan pending), then from then until the version had a verdict; the zoo jobs of "
          "this machine were paused (SIGSTOP) for the run\n")
    print("| version | alias held after (s) | verdict, after the hold (s) | verdict |")
    print("|---|---|---|---|")
    for version, held, verdict, status in rows:
        fmt = lambda x: "not within 300 s" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"| {version} | {fmt(held)} | {fmt(verdict)} | {status} |")
    held = [r[1] for r in rows if r[1] is not None]
    if held:
        print(f"\nAlias held after: median {statistics.median(held):.1f} s, max {max(held):.1f} s"
              f" over {len(held)} of {len(rows)} versions.")
    print("\n## An alias moved onto a quarantined version\n")
    print("| version | verdict | `@production` removed after (s) |")
    print("|---|---|---|")
    for version, status, removed in moved:
        fmt = {None: "not within 300 s"}.get(removed, removed if isinstance(removed, str)
                                                     else f"{removed:.1f}")
        print(f"| {version} | {status} | {fmt} |")
    gone = [r[2] for r in moved if isinstance(r[2], float)]
    if gone:
        print(f"\nRemoved after: median {statistics.median(gone):.1f} s, max {max(gone):.1f} s "
              f"over {len(gone)} of {len(moved)} versions.")


if __name__ == "__main__":
    main()
