"""Credentials and accounts of the scan platform: MLflow basic auth (three accounts), Prefect's
server auth string, the webhook's HMAC secret and the verdict seal's secret.

Each value comes from the environment if set, else from `<state_folder>/auth/credentials.json`
(mode 0600, git-ignored with the state folder), generated on first use (a file from an older
release gains the values it lacks):

| value | environment variable | used by |
|---|---|---|
| service account (MLflow admin) | MESA_MLFLOW_ADMIN_USER, _PASSWORD | the services only |
| publisher account | MESA_PUBLISHER_USER, _PASSWORD | clients (`client.env`) |
| reader account | MESA_READER_USER, _PASSWORD | auditors (`reader.env`) |
| Prefect auth string | PREFECT_API_AUTH_STRING | Prefect clients; the server |
| webhook secret | MESA_WEBHOOK_SECRET | MLflow signs webhook posts; the receiver checks |
| CSRF key | MLFLOW_FLASK_SERVER_SECRET_KEY | MLflow's basic-auth app (its forms) |
| webhook store key | MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY | MLflow encrypts webhook secrets |
| seal secret | MESA_SEAL_SECRET | seals the scan service's verdict tags (tasks.common.verdicts) |

The service account's variables are not MLflow's own (MLFLOW_TRACKING_USERNAME): a shell that
has sourced `client.env` and starts the services must not make the publisher their admin.

Accounts (MLflow basic auth's permissions, `accounts`, run by scripts/scan_services.sh start):
- the service: MLflow's admin; writes scan runs, verdict tags, seals, signatures, aliases.
- the publisher: creates experiments, runs, registered models and versions, and moves aliases of
  its own models; it may NOT set, change or delete any version's tags or description (a grant of
  READ on `registered_model_version` `*`), nor write a run into the scan service's experiment
  (MLflow's default permission, READ, which `accounts` checks). Verdict tags it puts on a new
  version are not a scan's: the audit rescans the version (tasks.scan.quarantine).
- the reader: reads everything (default READ); MLflow's basic auth still lets any signed-in
  account create experiments and models of its own, so it cannot be kept from that, only from
  other accounts' models.

    python -m tasks.scan.auth env [--params params.yaml] [--role publisher|reader|server]
    python -m tasks.scan.auth accounts [--params params.yaml]

`env` prints `export ...` lines for a shell: `publisher` (default) what `<state>/auth/client.env`
holds, `reader` what `reader.env` holds, `server` every secret and the servers' own variables,
and writes `<state>/auth/basic_auth.ini` for MLflow's basic-auth app (scripts/scan_services.sh
evals them for the services only). The secrets that seal verdicts and verify webhooks never
leave the service's 0600 files and environment.
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
ENV = {"mlflow_user": "MESA_MLFLOW_ADMIN_USER", "mlflow_password": "MESA_MLFLOW_ADMIN_PASSWORD",
       "publisher_user": "MESA_PUBLISHER_USER", "publisher_password": "MESA_PUBLISHER_PASSWORD",
       "reader_user": "MESA_READER_USER", "reader_password": "MESA_READER_PASSWORD",
       "prefect_auth": "PREFECT_API_AUTH_STRING", "webhook_secret": "MESA_WEBHOOK_SECRET",
       "seal_secret": "MESA_SEAL_SECRET", "flask_secret": "MLFLOW_FLASK_SERVER_SECRET_KEY",
       "webhook_key": "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"}
# What each role's shell gets: MLflow's own variables carry the role's account.
# Prefect OSS has one auth string for everything (pausing or deleting deployments included), so
# it stays with the service: a client registers models through MLflow only.
ROLES = {"publisher": ("publisher_user", "publisher_password"),
         "reader": ("reader_user", "reader_password"),
         "server": ("mlflow_user", "mlflow_password")}
CLIENT = ROLES["publisher"]  # all a client is given
PREVIOUS = "mlflow_password_previous"  # an admin password to be replaced on the server
TRACKING = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def state_folder(params: Params) -> Path:
    """The service's state folder (absolute)."""
    return Path(params.scan.state_folder).resolve()


def _generate() -> dict[str, str]:
    return {"mlflow_user": "mesa-admin", "mlflow_password": secrets.token_urlsafe(24),
            "publisher_user": "mesa-publisher", "publisher_password": secrets.token_urlsafe(24),
            "reader_user": "mesa-reader", "reader_password": secrets.token_urlsafe(24),
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
    if not isinstance(found, dict) or any(not isinstance(v, str) for v in found.values()):
        raise ValueError(f"{path}: not a JSON object of strings; delete it to make new ones")
    missing = [k for k in ENV if not found.get(k)]
    if missing:  # a file of an older release: keep what it has, add fresh values for the rest
        fresh = _generate()
        found |= {k: fresh[k] for k in missing}
        if "publisher_user" in missing and found.get("mlflow_password"):
            # before the accounts, client.env carried the admin's password to every client:
            # a new one, set on the server by `accounts` (which still knows the old one)
            found[PREVIOUS] = found["mlflow_password"]
            found["mlflow_password"] = fresh["mlflow_password"]
        _save(path, found)
    return found


def _save(path: Path, found: dict[str, str]) -> None:
    """Write the credentials file atomically, mode 0600."""
    fd = os.open(path.with_suffix(".tmp"), os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(found, fh, indent=1)
    os.replace(path.with_suffix(".tmp"), path)


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


def shell_env(params: Params, role: str = "publisher") -> str:
    """`export` lines of one role's variables (ROLES; `server` also every secret and the
    servers' own variables)."""
    state = state_folder(params)
    creds = credentials(state)
    user, password, *rest = ROLES[role]
    values = dict(zip(TRACKING, (creds[user], creds[password]), strict=True))
    values |= {ENV[k]: creds[k] for k in rest}
    if role == "server":
        values |= {ENV[k]: creds[k] for k in ENV}
        values |= {"PREFECT_SERVER_API_AUTH_STRING": creds["prefect_auth"],
                   "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_ini(state, creds)),
                   "MLFLOW_AUTH_ADMIN_USERNAME": creds["mlflow_user"],
                   "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"]}
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def accounts(params: Params, uri: str) -> list[str]:
    """Create the publisher and reader accounts on the MLflow server at `uri` (as its admin;
    idempotent), deny the publisher version edits, and make sure the scan service's
    experiment is the service's own. What was done, one line each.

    Raises:
        RuntimeError: the scan experiment exists and another account may write to it.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from tasks.common.tracking import scan_experiment

    state = state_folder(params)
    creds = credentials(state)
    done = _rotate_admin(uri, creds, state)
    os.environ.update(dict(zip(TRACKING, (creds["mlflow_user"], creds["mlflow_password"]),
                               strict=True)))
    admin = AuthServiceClient(uri)
    for role in ("publisher", "reader"):
        user, password = creds[f"{role}_user"], creds[f"{role}_password"]
        try:
            admin.get_user(user)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            admin.create_user(user, password)
            done.append(f"account {user} created ({role})")
        else:  # the file's password is the one client.env / reader.env hand out
            admin.update_user_password(user, password)
    admin.grant_user_permission(creds["publisher_user"], "registered_model_version", "*",
                                "READ")
    done.append(f"{creds['publisher_user']}: READ on every model version (no tag edits)")
    client, name = MlflowClient(uri), scan_experiment()
    found = client.get_experiment_by_name(name)
    exp_id = found.experiment_id if found else client.create_experiment(name)
    for role in ("publisher", "reader"):
        level = admin.get_user_permission(creds[f"{role}_user"], "experiment",
                                          exp_id).permission
        if level in ("EDIT", "MANAGE"):
            raise RuntimeError(f"experiment {name!r} ({exp_id}): account "
                               f"{creds[f'{role}_user']} holds {level} on it; only the scan "
                               "service may write scan runs (delete the experiment or revoke)")
    done.append(f"experiment {name!r} ({exp_id}): written by the service only")
    return done


def _rotate_admin(uri: str, creds: dict[str, str], state: Path) -> list[str]:
    """Set the admin's new password on the server, signing in with the old one, if the
    credentials file says one is due (`PREVIOUS`); what was done."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    previous = creds.get(PREVIOUS)
    if not previous or os.environ.get(ENV["mlflow_password"]):
        return []
    os.environ.update(dict(zip(TRACKING, (creds["mlflow_user"], previous), strict=True)))
    try:
        AuthServiceClient(uri).update_user_password(creds["mlflow_user"],
                                                    creds["mlflow_password"])
    except MlflowException as err:
        if err.error_code != "UNAUTHENTICATED":
            raise
        # the old password no longer works: set already (or the admin was made anew)
    path = Path(state) / "auth" / FILE
    stored = json.loads(path.read_text())
    stored.pop(PREVIOUS, None)
    _save(path, stored)
    return [f"{creds['mlflow_user']}: admin password replaced (older clients held it)"]


def main(argv: list[str] | None = None) -> None:
    """`python -m tasks.scan.auth env|accounts [--params FILE] [--role ROLE]`."""
    ap = argparse.ArgumentParser(prog="python -m tasks.scan.auth")
    ap.add_argument("command", choices=("env", "accounts"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--role", choices=tuple(ROLES), default="publisher",
                    help="whose variables `env` prints")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    if args.command == "env":
        print(shell_env(params, args.role), end="")
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        raise SystemExit("accounts: set MLFLOW_TRACKING_URI to the MLflow server (http...)")
    for line in accounts(params, uri):
        print(line)


if __name__ == "__main__":
    main()
