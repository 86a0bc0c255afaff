"""The audit trail: the ONLY module that imports mlflow (STYLE habit 5).

Layout in the MLflow store:
    experiment "mesa" (MESA_MLFLOW_EXPERIMENT overrides)
      parent run "pipeline ..."            one per pipeline run (a `dvc repro`, a Prefect
        nested run "data", "train", ...    pipeline flow); one nested run per stage executed
    registered models "mesa-backdoored", "mesa-repaired", "mesa-baseline-repaired"
      versions tagged with lineage: parent_model_version, data_hash, params_hash, model_sha256,
      scan_verdict; their source is the run artifact folder holding our safetensors + JSON
      manifest (no pickle, no pyfunc flavour).

Which parent a stage joins, named explicitly, never guessed: `MESA_PIPELINE_RUN_ID` if set
(scripts/run_pipeline.sh opens the parent before `dvc repro` and closes it after, with dvc.lock as
its artifact; flows.pipeline sets it for its sub-flows); else, inside `dvc exp run`, the parent of
that experiment (DVC's own `DVC_EXP_NAME`); else a parent of the stage's own.

Store: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<project>/mlflow.db` with artifacts in
`<project>/mlartifacts`. An http(s) server is probed on `/health` first, so a down server fails
in seconds with a clear `TrackingError` instead of retrying.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.common import dvcgraph
from tasks.common.env import PARENT_RUN_ENV, apply_defaults
from tasks.common.params import Params

apply_defaults()  # telemetry off and short HTTP retries, before mlflow reads them

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

EXPERIMENT_ENV = "MESA_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "mesa"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
BACKDOORED = "mesa-backdoored"
REPAIRED = "mesa-repaired"
BASELINE_REPAIRED = "mesa-baseline-repaired"
PACKAGES = ("torch", "torchvision", "numpy", "mlflow", "prefect", "dvc", "great-expectations",
            "safetensors", "mesa-pipeline")
_BATCH = 100  # MLflow accepts at most 100 params / 1000 metrics per log_batch call


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


@dataclass(frozen=True)
class StageRun:
    """A small, picklable handle of a nested stage run (tasks receive it instead of a client)."""

    run_id: str
    parent_id: str
    stage: str
    uri: str


# --------------------------------------------------------------------------- store


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / DB_FILE}"


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast if an http(s) tracking server does not answer /health within `timeout` s."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            if response.status != 200:
                raise TrackingError(f"MLflow server {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({err}). Start it (mlflow server "
            "...) or unset MLFLOW_TRACKING_URI to use the local SQLite store mlflow.db."
        ) from None


def _artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to `mlartifacts/` beside the database file."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / ARTIFACT_DIR).resolve().as_uri()


@cache
def _client(uri: str) -> MlflowClient:
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as err:
        raise TrackingError(f"cannot open the MLflow store {uri}: {err}") from None


def client(uri: str | None = None) -> MlflowClient:
    """A client of the configured store (checked reachable once per process)."""
    return _client(uri or tracking_uri())


def experiment_id(c: MlflowClient, uri: str, name: str | None = None) -> str:
    """Id of the experiment `name` (default: the pipeline's), created on first use."""
    name = name or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    try:
        found = c.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return c.create_experiment(name, artifact_location=_artifact_location(uri))
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri}: cannot get experiment {name!r}: {err}") from None


def preflight() -> str:
    """Reach the store and its experiment now (before any work); return the tracking URI."""
    uri = tracking_uri()
    experiment_id(client(uri), uri)
    return uri


# --------------------------------------------------------------------------- tags


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> tuple[str, bool]:
    """(commit sha or 'none', True if tracked files differ from it)."""
    commit = _git("rev-parse", "HEAD") or "none"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return commit, dirty


def changed_files(paths: tuple[str, ...]) -> list[str]:
    """Tracked files under `paths` that differ from the checked-out commit."""
    out = _git("status", "--porcelain", "--untracked-files=no", "--", *paths) or ""
    return [line[3:] for line in out.splitlines() if line.strip()]


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_tags(params: Params, device: str) -> dict[str, str]:
    """Tags every run carries: code, data, params, device and package versions."""
    commit, dirty = git_state()
    versions = package_versions()
    tags = {
        "git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower(),
        "data.md5": dvcgraph.data_md5(), "params.hash": params.digest(), "device": device,
        "versions": json.dumps(versions, sort_keys=True),
    }
    tags.update({f"version.{k}": v for k, v in versions.items()})
    return tags


# --------------------------------------------------------------------------- runs


def _invocation_key() -> str:
    """Key shared by the stages of one `dvc exp run` (DVC's experiment name), else unique."""
    exp = os.environ.get("DVC_EXP_NAME")
    return f"dvc-exp-{exp}" if exp else f"standalone-{os.getpid()}-{time.time_ns()}"


def _log_params(c: MlflowClient, run_id: str, flat: Mapping[str, Any]) -> None:
    items = [Param(k, json.dumps(v) if isinstance(v, list | tuple) else str(v))
             for k, v in flat.items()]
    for start in range(0, len(items), _BATCH):
        c.log_batch(run_id, params=items[start : start + _BATCH])


def _create_parent(c: MlflowClient, exp: str, params: Params, device: str, key: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    tags = {**run_tags(params, device), "mesa.role": "pipeline", "mesa.invocation": key}
    run = c.create_run(exp, run_name=f"pipeline {stamp}", tags=tags)
    _log_params(c, run.info.run_id, params.section(*params.to_dict()))
    return run.info.run_id


def _parent(c: MlflowClient, exp: str, params: Params, device: str) -> tuple[str, bool]:
    """(parent run id, whether this stage owns its status)."""
    explicit = os.environ.get(PARENT_RUN_ENV)
    if explicit:
        try:
            c.get_run(explicit)
        except MlflowException:
            raise TrackingError(f"{PARENT_RUN_ENV}={explicit} is not a run in "
                                f"{tracking_uri()}") from None
        return explicit, False  # whoever opened it closes it
    key = _invocation_key()
    found = c.search_runs([exp], f"tags.`mesa.invocation` = '{key}'", max_results=1)
    return (found[0].info.run_id if found else _create_parent(c, exp, params, device, key)), True


def open_pipeline(params: Params, device: str, key: str | None = None) -> str:
    """Create the parent run of one pipeline run; its stages join it via MESA_PIPELINE_RUN_ID."""
    uri = tracking_uri()
    c = client(uri)
    key = key or f"pipeline-{os.getpid()}-{time.time_ns()}"
    return _create_parent(c, experiment_id(c, uri), params, device, key)


def close_pipeline(run_id: str, status: str, artifacts: tuple[Path, ...] = ()) -> None:
    """End a parent run FINISHED or FAILED, attaching e.g. dvc.lock (the exact DVC record)."""
    c = client()
    for path in artifacts:
        if Path(path).is_file():
            c.log_artifact(run_id, str(path), "dvc")
    c.set_terminated(run_id, status)


@contextmanager
def pipeline_run(params: Params, device: str) -> Iterator[str]:
    """A parent run for an in-process pipeline; stages started inside join it (via the env)."""
    run_id = open_pipeline(params, device)
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield run_id
        close_pipeline(run_id, "FINISHED")
    except BaseException:
        close_pipeline(run_id, "FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


@contextmanager
def stage_run(stage: str, params: Params, device: str) -> Iterator[StageRun]:
    """A nested run for one stage: params of its groups, tags, FINISHED or FAILED at the end."""
    uri = tracking_uri()
    c = client(uri)
    exp = experiment_id(c, uri)
    parent, owns_parent = _parent(c, exp, params, device)
    if owns_parent:
        c.update_run(parent, status="RUNNING")
    tags = {**run_tags(params, device), "mlflow.parentRunId": parent, "mesa.role": "stage",
            "mesa.stage": stage}
    run = c.create_run(exp, run_name=stage, tags=tags)
    _log_params(c, run.info.run_id, params.section(*dvcgraph.param_groups(stage)))
    handle = StageRun(run.info.run_id, parent, stage, uri)
    try:
        yield handle
    except BaseException:
        c.set_terminated(run.info.run_id, "FAILED")
        c.set_terminated(parent, "FAILED")  # a failed stage fails its whole run
        raise
    c.set_terminated(run.info.run_id, "FINISHED")
    if owns_parent:
        c.set_terminated(parent, "FINISHED")


# --------------------------------------------------------------------------- logging


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a.b": 1.0}; numbers and bools only (strings are skipped)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, bool | int | float):
            out[name] = float(value)
    return out


def log_metrics(run: StageRun, values: Mapping[str, Any], step: int = 0) -> None:
    """Log (nested) numeric values as metrics at `step`."""
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in flatten(values).items()]
    c = client(run.uri)
    for start in range(0, len(items), 1000):
        c.log_batch(run.run_id, metrics=items[start : start + 1000])


def epoch_logger(run: StageRun, prefix: str) -> Callable[[int, Mapping[str, float]], None]:
    """A per-epoch sink for the mesa_lib callbacks: logs `prefix.<key>` at step=epoch."""

    def log(epoch: int, values: Mapping[str, float]) -> None:
        log_metrics(run, {prefix: dict(values)}, step=epoch)

    return log


def log_final(run: StageRun, metrics: Mapping[str, Any]) -> None:
    """The stage's final metrics: exactly the dict written to its DVC metrics JSON."""
    log_metrics(run, metrics)
    client(run.uri).set_tag(run.run_id, "mesa.metrics", json.dumps(metrics, sort_keys=True)[:5000])


def log_artifacts(run: StageRun, paths: list[Path], folder: str | None = None) -> None:
    """Copy files or folders into the run's artifact store under `folder`."""
    c = client(run.uri)
    for p in paths:
        if Path(p).is_dir():
            c.log_artifacts(run.run_id, str(p), f"{folder}/{Path(p).name}" if folder else None)
        else:
            c.log_artifact(run.run_id, str(p), folder)


def set_tags(run: StageRun, tags: Mapping[str, Any]) -> None:
    """Tag the stage run (values become strings)."""
    c = client(run.uri)
    c.log_batch(run.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# --------------------------------------------------------------------------- registry


def register_model(
    run: StageRun, files: tuple[Path, ...], name: str, tags: Mapping[str, str], description: str,
    alias: str | None = "current",
) -> str:
    """Log a model's files under the run's `model/` folder and register them as a new version.

    Args:
        files: the `.safetensors` weights and `.json` manifest (mesa_lib.modelio).
        tags: lineage tags of the version (parent_model_version, data_hash, params_hash, ...).
        alias: alias moved to the new version (None: none, e.g. for a quarantined model).

    Returns:
        The new version number, as a string.
    """
    c = client(run.uri)
    for f in files:
        c.log_artifact(run.run_id, str(f), "model")
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by a concurrent registration
            c.get_registered_model(name)
    source = f"{c.get_run(run.run_id).info.artifact_uri}/model"
    version = c.create_model_version(name, source, run_id=run.run_id,
                                     tags={k: str(v) for k, v in tags.items()},
                                     description=description)
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def find_model_version(name: str, sha256: str, uri: str | None = None) -> str | None:
    """Newest version of `name` whose weights have this sha256, or None."""
    c = client(uri)
    try:
        found = c.search_model_versions(f"name = '{name}' and tag.model_sha256 = '{sha256}'")
    except MlflowException:
        return None
    return max((str(v.version) for v in found), key=int, default=None)


def tag_model_version(name: str, version: str, tags: Mapping[str, Any], uri: str | None = None
                      ) -> None:
    """Add or overwrite tags of a registered model version."""
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value))


def model_version_tags(name: str, version: str, uri: str | None = None) -> dict[str, str]:
    """The tags of a registered model version."""
    return dict(client(uri).get_model_version(name, version).tags)


def model_version(name: str, version: str, uri: str | None = None) -> dict[str, Any]:
    """One version: name, version, source, run_id, tags, aliases, description."""
    v = client(uri).get_model_version(name, version)
    return {"name": v.name, "version": str(v.version), "source": v.source,
            "run_id": v.run_id or "", "tags": dict(v.tags), "aliases": list(v.aliases or []),
            "description": v.description or ""}


def delete_model_version_tags(name: str, version: str, keys: tuple[str, ...],
                              uri: str | None = None) -> None:
    """Remove tags of a version (absent ones are ignored)."""
    c = client(uri)
    present = set(c.get_model_version(name, version).tags)
    for key in keys:
        if key in present:
            c.delete_model_version_tag(name, version, key)


def model_aliases(name: str, uri: str | None = None) -> dict[str, str]:
    """{alias: version} of a registered model."""
    return {a: str(v) for a, v in client(uri).get_registered_model(name).aliases.items()}


def set_alias(name: str, alias: str, version: str, uri: str | None = None) -> None:
    """Point `alias` of a registered model at `version` (an alias names one version)."""
    client(uri).set_registered_model_alias(name, alias, version)


def delete_alias(name: str, alias: str, uri: str | None = None) -> None:
    """Remove an alias from a registered model."""
    client(uri).delete_registered_model_alias(name, alias)


def set_version_description(name: str, version: str, text: str, uri: str | None = None) -> None:
    """Replace a version's description (the MLflow UI renders it as Markdown)."""
    client(uri).update_model_version(name, version, description=text)


def set_model_tags(name: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    """Tags of a registered model (the model list shows them)."""
    c = client(uri)
    for key, value in tags.items():
        c.set_registered_model_tag(name, key, str(value))


def run_record(run_id: str, uri: str | None = None) -> dict[str, Any] | None:
    """A run's status, experiment, tags and metrics, or None if there is no such run."""
    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        return None
    return {"status": run.info.status, "experiment_id": run.info.experiment_id,
            "artifact_uri": run.info.artifact_uri, "tags": dict(run.data.tags),
            "metrics": dict(run.data.metrics)}


def log_artifact_to(run_id: str, path: Path, folder: str | None = None,
                    uri: str | None = None) -> None:
    """Add a file to any run's artifacts (e.g. a signature beside a version's files)."""
    client(uri).log_artifact(run_id, str(path), folder)


def ensure_webhook(name: str, url: str, events: list[str], secret: str,
                   uri: str | None = None) -> str:
    """Create the registry webhook `name`, or update it to this url/events/secret; its id."""
    c = client(uri)
    try:
        found = [w for w in _pages(c.list_webhooks) if w.name == name]
        if found:
            return c.update_webhook(found[0].webhook_id, url=url, events=events, secret=secret,
                                    status="ACTIVE").webhook_id
        return c.create_webhook(name, url, events=events, secret=secret).webhook_id
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri or tracking_uri()}: cannot register webhook "
                            f"{name!r} -> {url}: {err}") from None



# --------------------------------------------------------------------------- scan service

SCAN_EXPERIMENT_ENV = "MESA_SCAN_EXPERIMENT"
SCAN_EXPERIMENT = "mesa-scan"


class ModelSourceError(ValueError):
    """A registered version's files cannot be fetched although the server answers."""


def scan_experiment() -> str:
    """Name of the scan service's experiment (MESA_SCAN_EXPERIMENT or 'mesa-scan')."""
    return os.environ.get(SCAN_EXPERIMENT_ENV, SCAN_EXPERIMENT)


def _process_start(pid: int) -> str:
    """Start time of process `pid` in clock ticks since boot ('' if unknown): with the pid it
    names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags naming the process that owns a run, so a later start can tell it was killed."""
    return {"mesa.host": socket.gethostname(), "mesa.pid": str(os.getpid()),
            "mesa.pid_start": _process_start(os.getpid())}


def start_run(run_name: str, tags: Mapping[str, Any], experiment: str | None = None) -> StageRun:
    """A top-level run in `experiment` (default: MESA_SCAN_EXPERIMENT or 'mesa-scan'), tagged
    with its owning process (see `fail_orphaned_runs`)."""
    uri = tracking_uri()
    c = client(uri)
    exp = experiment_id(c, uri, experiment or scan_experiment())
    tags = {**process_tags(), **{k: str(v) for k, v in tags.items()}}
    run = c.create_run(exp, run_name=run_name, tags=tags)
    return StageRun(run.info.run_id, "", "scan", uri)


def _owner_gone(tags: Mapping[str, str]) -> bool:
    """True if the run's owning process ran on this host and no longer exists."""
    if tags.get("mesa.host") != socket.gethostname() or not tags.get("mesa.pid", "").isdigit():
        return False  # another machine's run: only that machine can tell
    pid = int(tags["mesa.pid"])
    start = _process_start(pid)
    return not start or start != tags.get("mesa.pid_start", start)


def fail_orphaned_runs(experiment: str | None = None, uri: str | None = None) -> list[str]:
    """Mark FAILED every RUNNING run of `experiment` whose process was killed (kill -9 leaves
    MLflow runs RUNNING forever); returns their ids."""
    c = client(uri)
    found = c.get_experiment_by_name(experiment or scan_experiment())
    if found is None:
        return []
    failed = []
    for run in _pages(c.search_runs, experiment_ids=[found.experiment_id],
                      filter_string="attributes.status = 'RUNNING'"):
        if _owner_gone(run.data.tags):
            c.set_tag(run.info.run_id, "mesa.failure", "its process ended without finishing the "
                      f"run (killed?): pid {run.data.tags['mesa.pid']} on "
                      f"{run.data.tags['mesa.host']}")
            c.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
    return failed


def end_run(run: StageRun, status: str = "FINISHED") -> None:
    """Mark a run FINISHED or FAILED."""
    client(run.uri).set_terminated(run.run_id, status)


def log_params(run: StageRun, flat: Mapping[str, Any]) -> None:
    """Log flat {"group.key": value} params (lists as JSON)."""
    _log_params(client(run.uri), run.run_id, flat)


def log_text(run: StageRun, text: str, artifact_file: str) -> None:
    """Store `text` as the run artifact `artifact_file` (e.g. 'verdict.json')."""
    client(run.uri).log_text(run.run_id, text, artifact_file)


def _pages(search: Callable[..., Any], **kwargs: Any) -> list[Any]:
    out, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        out += list(page)
        token = page.token
        if not token:
            return out


def model_versions(names: tuple[str, ...], uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of the registered models `names` ('*' = all): name, version, source, tags."""
    c = client(uri)
    try:
        if "*" in names:
            names = tuple(m.name for m in _pages(c.search_registered_models))
        found = []
        for name in names:
            if "'" in name:
                continue  # not expressible in a filter string; never created by this project
            found += _pages(c.search_model_versions, filter_string=f"name = '{name}'")
    except MlflowException as err:
        raise TrackingError(f"MLflow store {uri or tracking_uri()}: cannot list model versions: "
                            f"{err}") from None
    return [{"name": v.name, "version": str(v.version), "source": v.source,
             "run_id": v.run_id or "", "tags": dict(v.tags),
             "aliases": list(getattr(v, "aliases", []) or [])} for v in found]


def download_model_version(source: str, dst: Path, uri: str | None = None) -> Path:
    """Fetch a version's artifact folder into `dst` (TrackingError if the server is down)."""
    from mlflow.artifacts import download_artifacts

    uri = uri or tracking_uri()
    check_reachable(uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    except (MlflowException, OSError) as err:
        check_reachable(uri)  # a server that went down is a TrackingError, not a bad source
        raise ModelSourceError(f"cannot download {source}: {err}") from None


def _cli(argv: list[str] | None = None) -> None:
    """`python -m tasks.common.tracking open PARAMS | close RUN_ID STATUS [FILE...]`.

    scripts/run_pipeline.sh opens the parent run before `dvc repro` (printing its id) and closes
    it afterwards with dvc.lock attached.
    """
    import argparse

    from tasks.common.params import ConfigError, load_params

    parser = argparse.ArgumentParser(prog="python -m tasks.common.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("open").add_argument("params", nargs="?", default="params.yaml")
    close = sub.add_parser("close")
    close.add_argument("run_id")
    close.add_argument("status", choices=("FINISHED", "FAILED", "KILLED"))
    close.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "open":
            params = load_params(args.params)
            print(open_pipeline(params, params.base.device))
        else:
            close_pipeline(args.run_id, args.status, tuple(args.files))
    except (ConfigError, TrackingError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    _cli()
