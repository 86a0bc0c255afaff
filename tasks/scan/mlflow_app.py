"""The MLflow server's app on the scan platform: MLflow's basic-auth app with one rule its
permissions cannot express.

MLflow grants permissions per experiment and per registered model, not per version: an account
that may register versions of a model may also move an alias onto any version of it, a
quarantined one included. Here setting an alias on a quarantined version (tagged
`quarantined=true` or with a backdoored / rejected verdict: tasks.common.verdicts) is refused
(403) to every account but an admin (the scan service, whose quarantine and clearance move
aliases); everything else is MLflow's own `basic-auth` app. `scripts/scan_services.sh` starts
`mlflow server --app-name mesa-auth` (the `mlflow.app` entry point of pyproject.toml). The event
path that takes such an alias off again (`scan-alias`) stays, for a server started without it.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, request
from mlflow.exceptions import MlflowException
from mlflow.server import app as mlflow_app
from mlflow.server import auth
from mlflow.server.handlers import _get_model_registry_store

from tasks.common.verdicts import is_quarantined


def _target_is_quarantined() -> bool:
    """Whether the version a set-alias request names is quarantined (a request naming no
    version, or a version that does not exist, is left to MLflow's own answer)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not body.get("name") or not body.get("version"):
        return False
    try:
        version = _get_model_registry_store().get_model_version(str(body["name"]),
                                                                 str(body["version"]))
    except MlflowException:
        return False
    return is_quarantined(version.tags)


def _refusing_quarantined(validator: Callable[[], bool]) -> Callable[[], bool]:
    def check() -> bool:
        return validator() and not _target_is_quarantined()

    return check


def create_app(app: Flask = mlflow_app):
    """MLflow's basic-auth app, its set-alias validator refusing quarantined versions (admins
    are not validated: MLflow lets them through before any validator)."""
    for key, validator in list(auth.BEFORE_REQUEST_VALIDATORS.items()):
        if validator is auth.validate_can_set_model_or_prompt_version_alias:
            auth.BEFORE_REQUEST_VALIDATORS[key] = _refusing_quarantined(validator)
    return auth.create_app(app)
