"""The process environment and the deployment's paths: everything mesa_lib must not know.

`apply_defaults` is called first by every entry point (`flows/__init__.py`, the scripts, the
test fixtures), before prefect, mlflow, great_expectations or CUDA start: telemetry off, tool
state inside the project, short timeouts. Values already set by the user win.

`default_data_source` says where CIFAR-10 comes from when nobody says so.
"""

from __future__ import annotations

import os
from pathlib import Path

PARENT_RUN_ENV = "MESA_PIPELINE_RUN_ID"  # MLflow parent run shared by the stages of one run
DATA_SOURCE_ENV = "MESA_DATA_SOURCE"  # a CIFAR archive or folder overriding the default
# The offline copy of CIFAR-10 on these machines (../shared/datasets/README.md).
OFFLINE_COPY = Path("..") / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CANONICAL_ARCHIVE = "cifar-10-python.tar.gz"
CACHE_DIR = Path(".cache") / "mesa"  # decoded image-folder archives (git-ignored)


def defaults(root: Path | None = None) -> dict[str, str]:
    """The defaults `apply_defaults` sets (for docs and tests)."""
    root = Path(root or Path.cwd()).resolve()
    return {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "true",
        "PREFECT_HOME": str(root / ".prefect"),
        # A down tracking server must fail in seconds, not retry for minutes.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # mlflow parses an int
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        # Deterministic cuBLAS (mesa_lib.seed.seed_everything); read when CUDA starts.
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


def apply_defaults(root: Path | None = None) -> None:
    """Set every default that the environment does not already set."""
    for key, value in defaults(root).items():
        os.environ.setdefault(key, value)


def default_data_source(project_root: Path | None = None) -> Path:
    """Where CIFAR-10 comes from when nobody says.

    $MESA_DATA_SOURCE if set; else the offline copy `<root>/../shared/datasets/cifar10-jpeg.tar.gz`
    if present; else the canonical archive `<root>/data/cifar-10-python.tar.gz` (which
    `mesa_lib.data.load_cifar` downloads if missing).
    """
    root = Path(project_root or Path.cwd())
    env = os.environ.get(DATA_SOURCE_ENV)
    if env:
        return Path(env)
    offline = (root / OFFLINE_COPY).resolve()
    return offline if offline.exists() else root / "data" / CANONICAL_ARCHIVE
