"""Credentials of the scan platform: MLflow basic auth, Prefect's server auth string, the
webhook's HMAC secret and the verdict seal's secret.

Each value comes from the environment if set, else from `<state_folder>/auth/credentials.json`
(mode 0600, git-ignored with the state folder), generated on first use:

| value | environment variable | used by |
|---|---|---|
| MLflow user, password | MLFLOW_TRACKING_USERNAME, _PASSWORD | MLflow clients; the server's admin |
| Prefect auth string | PREFECT_API_AUTH_STRING | Prefect clients; the server |
| webhook secret | MESA_WEBHOOK_SECRET | MLflow signs webhook posts; the receiver checks |
| CSRF key | MLFLOW_FLASK_SERVER_SECRET_KEY | MLflow's basic-auth app (its forms) |
| webhook store key | MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY | MLflow encrypts webhook secrets |
| seal secret | MESA_SEAL_SECRET | seals the scan service's verdict tags (tasks.common.verdicts) |

    python -m tasks.scan.auth env [--params params.yaml] [--server]

prints `export ...` lines for a shell: without `--server` only the clients' (the MLflow and
Prefect credentials: what `<state>/auth/client.env` holds, the file users `source`); `--server`
adds every secret above and the servers' own variables and writes `<state>/auth/basic_auth.ini`
for MLflow's basic-auth app (scripts/scan_services.sh evals them for the services only). The
secrets that seal verdicts and verify webhooks never leave the service's 0600 files and
environment.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
from pathlib import Path

from tasks.common.params import Params, load_params

FILE = "credentials.json"
ENV = {"mlflow_user": "MLFLOW_TRACKING_USERNAME", "mlflow_password": "MLFLOW_TRACKING_PASSWORD",
       "prefect_auth": "PREFECT_API_AUTH_STRING", "webhook_secret": "MESA_WEBHOOK_SECRET",
       "seal_secret": "MESA_SEAL_SECRET", "flask_secret": "MLFLOW_FLASK_SERVER_SECRET_KEY",
       "webhook_key": "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"}
CLIENT = ("mlflow_user", "mlflow_password", "prefect_auth")  # all a client is given


def state_folder(params: Params) -> Path:
    """The service's state folder (absolute)."""
    return Path(params.scan.state_folder).resolve()


def _generate() -> dict[str, str]:
    return {"mlflow_user": "mesa-admin", "mlflow_password": secrets.token_urlsafe(24),
            "prefect_auth": f"mesa:{secrets.token_urlsafe(24)}",
            "webhook_secret": secrets.token_urlsafe(32), "seal_secret": secrets.token_urlsafe(32),
            "flask_secret": secrets.token_urlsafe(32),
            "webhook_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}


def _stored(state: Path) -> dict[str, str]:
    """The credentials file, created (0600, folder 0700) with fresh secrets on first use."""
    path = state / "auth" / FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(_generate(), fh, indent=1)
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable credentials file ({err}); delete it to make new "
                         "ones") from None
    missing = [k for k in ENV if not isinstance(found.get(k), str) or not found[k]]
    if missing:
        raise ValueError(f"{path}: credentials file lacks {missing}; delete it to make new ones")
    return found


def credentials(state: Path) -> dict[str, str]:
    """Every credential: the environment's where set, else the state folder's file."""
    env = {k: os.environ[v] for k, v in ENV.items() if os.environ.get(v)}
    return env if len(env) == len(ENV) else {**_stored(Path(state)), **env}


def seal_secret(params: Params) -> str:
    """The secret that seals verdict tags."""
    return os.environ.get(ENV["seal_secret"]) or credentials(state_folder(params))["seal_secret"]


def mlflow_ini(state: Path, creds: dict[str, str]) -> Path:
    """basic_auth.ini for `mlflow server --app-name basic-auth` (its user store in the state
    folder; no anonymous access: default_permission applies to signed-in users only)."""
    path = Path(state) / "auth" / "basic_auth.ini"
    path.write_text("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = sqlite:///{Path(state).resolve() / 'auth' / 'users.db'}\n"
                    f"admin_username = {creds['mlflow_user']}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                    # each request would otherwise hash the password again (PBKDF2, about
                    # 0.1-0.3 s of CPU here): a scan's recording makes dozens of requests
                    "auth_cache_ttl_seconds = 300\n")
    os.chmod(path, 0o600)
    return path


def shell_env(params: Params, server: bool = False) -> str:
    """`export` lines of the clients' variables (with `server`, also every secret and the
    servers' own variables)."""
    state = state_folder(params)
    creds = credentials(state)
    values = {ENV[k]: creds[k] for k in (ENV if server else CLIENT)}
    if server:
        values |= {"PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth"],
                   "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_ini(state, creds)),
                   "MLFLOW_AUTH_ADMIN_USERNAME": creds["mlflow_user"],
                   "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"]}
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.scan.auth env [--params FILE] [--server]`."""
    ap = argparse.ArgumentParser(prog="python -m tasks.scan.auth")
    ap.add_argument("command", choices=("env",))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--server", action="store_true", help="also the servers' variables")
    args = ap.parse_args(argv)
    print(shell_env(load_params(args.params), args.server), end="")


if __name__ == "__main__":
    main()
