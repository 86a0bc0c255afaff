"""Process environment defaults: telemetry off, tool state inside the project, short timeouts.

Called first by every entry point (`flows/__init__.py`, the scripts, the test fixtures), before
prefect, mlflow or great_expectations is imported. Values already set by the user win.
"""

from __future__ import annotations

import os
from pathlib import Path

PARENT_RUN_ENV = "MESA_PIPELINE_RUN_ID"  # MLflow parent run shared by the stages of one run


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
    }


def apply_defaults(root: Path | None = None) -> None:
    """Set every default that the environment does not already set."""
    for key, value in defaults(root).items():
        os.environ.setdefault(key, value)
