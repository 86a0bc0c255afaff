"""What every stage flow shares: checks before work, the tracked stage context, publishing.

A stage command (`python -m flows.<stage>`) goes through `main()`: params.yaml is validated and
the MLflow store reached BEFORE Prefect starts or any data is read, so a typo or a down server
fails in seconds with the offending key or URI named.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task

from mesa_lib.seed import resolve_device, seed_everything
from tasks.common import catalog, tracking
from tasks.common.io import write_json
from tasks.common.params import ConfigError, Params, load_params
from tasks.common.tracking import StageRun, TrackingError

# Formats copied into the MLflow artifact store by `publish`. npz data sets stay in DVC only;
# models are logged once, under the run's `model/` folder, when tasks.pipeline.registry
# registers them.
_LOGGED_FORMATS = ("sampler", "json", "csv", "png", "html-dir", "folder")


@dataclass(frozen=True)
class StageContext:
    """What a stage flow body gets: validated params, the device and its tracked run."""

    params: Params
    device: torch.device
    run: StageRun


@contextmanager
def open_stage(stage: str, params_path: str | Path = "params.yaml") -> Iterator[StageContext]:
    """Load params, seed, pick the device, and open the stage's nested MLflow run."""
    params = load_params(params_path)
    seed_everything(params.base.seed, params.base.deterministic)
    device = resolve_device(params.base.device)
    label = str(device) + (f" ({torch.cuda.get_device_name(device)})"
                           if device.type == "cuda" else "")
    with tracking.stage_run(stage, params, label) as run:
        yield StageContext(params, device, run)


@task(retries=2, retry_delay_seconds=2)
def publish(run: StageRun, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's DVC metrics JSON, log the SAME dict to MLflow, log its artifacts."""
    write_json(catalog.metrics_path(stage), metrics)
    tracking.log_final(run, metrics)
    for artifact in catalog.of_stage(stage):
        if artifact.fmt in _LOGGED_FORMATS and all(p.exists() for p in artifact.files()):
            tracking.log_artifacts(run, list(artifact.files()), f"{stage}/{artifact.name}")
    return metrics


def check_or_exit(params_path: str) -> None:
    """Validate the params file and reach the MLflow store before any work, or exit naming why."""
    try:
        load_params(params_path)
        tracking.preflight()
    except (ConfigError, TrackingError) as err:
        sys.exit(f"error: {err}")


def main(flow: Callable[..., Any]) -> None:
    """Command-line entry of a stage flow: `python -m flows.<stage> [--params FILE]`."""
    parser = argparse.ArgumentParser(description=(flow.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (%(default)s)")
    args = parser.parse_args()
    check_or_exit(args.params)
    try:
        flow(params_path=args.params)
    except Exception as err:  # the flow already logged the traceback; end with the cause
        sys.exit(f"error: stage failed: {type(err).__name__}: {err}")
