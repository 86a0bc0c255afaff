"""A scan-service project in a temporary folder, for the platform tests: params (scan settings,
state and drop folders, ports), a reference npz, a plumbing calibration; free ports; the
servers of scripts/scan_services.sh started and always stopped."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from backdoor_fixture import synthetic_data
from pipeline_fixture import ROOT, write_scan_params

MODELS = Path(__file__).parent / "fixtures" / "scan_models"
SCRIPT = ROOT / "scripts" / "scan_services.sh"
# Detection settings that find the tiny backdoor (as tests/test_scan.py TUNED).
TUNED = {"scan.images": 1024, "scan.detectors.mask.steps": 200,
         "scan.detectors.mask.batch_size": 16, "repair.epochs": 1, "repair.batch_size": 64}
FAST = {"scan.images": 64, "scan.detectors.mask.steps": 4, "scan.detectors.mask.batch_size": 8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_project(root: Path, overrides: dict[str, Any]) -> Path:
    """params.yaml (state, drop folder, reference, calibration under `root`); its path."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_data(1024, 1)
    np.savez(root / "reference.npz", images=images.numpy(), labels=labels.numpy(),
             classes=np.array([f"class{k}" for k in range(6)]))
    (root / "drop").mkdir(exist_ok=True)
    return write_scan_params(root, overrides)


def copy_model(source: str, dst: Path, variant: str = "") -> Path:
    """A fixture model as `dst`.safetensors/.json; `variant` makes its files unique."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODELS / f"{source}.safetensors", f"{dst}.safetensors")
    text = (MODELS / f"{source}.json").read_text()
    Path(f"{dst}.json").write_text(text.replace('"data_hash": ""', f'"data_hash": "{variant}"'))
    return dst


class Services:
    """scripts/scan_services.sh on free ports for one params file."""

    def __init__(self, params: Path, prefect_port: int, mlflow_port: int) -> None:
        self.params, self.state = params, Path(yaml.safe_load(params.read_text())["scan"]
                                               ["state_folder"])
        self.env = {**os.environ, "SCAN_PARAMS": str(params), "PREFECT_PORT": str(prefect_port),
                    "MLFLOW_PORT": str(mlflow_port)}
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILE"):
            self.env.pop(key, None)
        self.mlflow = f"http://127.0.0.1:{mlflow_port}"
        self.prefect = f"http://127.0.0.1:{prefect_port}/api"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def credentials(self) -> dict[str, str]:
        return json.loads((self.state / "auth" / "credentials.json").read_text())

    def service_env(self) -> dict[str, str]:
        """The environment the services run with (and a flow run by hand as the service):
        servers, the service account, every secret."""
        return self._env("mlflow")

    def client_env(self) -> dict[str, str]:
        """The environment of a client that sourced client.env: the publisher account."""
        return self._env("publisher")

    def _env(self, account: str) -> dict[str, str]:
        creds = self.credentials()
        env = {**self.env, "MLFLOW_TRACKING_URI": self.mlflow, "PREFECT_API_URL": self.prefect,
               "MLFLOW_TRACKING_USERNAME": creds[f"{account}_user"],
               "MLFLOW_TRACKING_PASSWORD": creds[f"{account}_password"],
               "PREFECT_HOME": str(self.state / "prefect")}
        if account == "mlflow":  # the services: Prefect's one auth string and the seal
            env |= {"MESA_SEAL_SECRET": creds["seal_secret"],
                    "PREFECT_API_AUTH_STRING": creds["prefect_auth"]}
        return env

    def logs(self) -> str:
        out = []
        for log in sorted((self.state / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(out)


def http(method: str, url: str, body: Any = None, auth: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; `auth` = "user:password" basic auth."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
