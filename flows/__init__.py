"""Prefect flows: one per DVC stage (`python -m flows.<stage>`) and `flows.pipeline` for all.

Importing this package first sets the environment defaults (telemetry off, PREFECT_HOME inside
the project, short MLflow HTTP timeouts) before prefect or mlflow is imported.
"""

from tasks.common.env import apply_defaults

apply_defaults()
