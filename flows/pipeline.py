"""The whole pipeline as ONE Prefect flow, each DVC stage a sub-flow, in dvc.yaml's order.

For users who drive the pipeline from Prefect instead of DVC. The stage graph is read from
dvc.yaml through DVC's own API (tasks.common.dvcgraph), never restated here; stage `<name>` runs
`flows.<name>.FLOW`. All stages
run (Prefect does not know DVC's cache); `dvc commit` afterwards records the results in
dvc.lock so that a later `dvc repro` sees them as up to date.

    python -m flows.pipeline [--params params.yaml] [--stages data validate ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from prefect import flow

from mesa_lib.seed import resolve_device
from tasks.common import dvcgraph, tracking
from tasks.common.params import load_params
from tasks.pipeline.stage import check_or_exit


def stage_flow(name: str):
    """The Prefect flow of DVC stage `name` (module flows.<name>, attribute FLOW)."""
    return importlib.import_module(f"flows.{name}").FLOW


@flow(name="mesa-pipeline")
def pipeline(params_path: str = "params.yaml", stages: Sequence[str] | None = None) -> dict:
    """Run the stages of dvc.yaml in topological order under one MLflow parent run."""
    params = load_params(params_path)
    order = dvcgraph.stage_order()
    unknown = sorted(set(stages or ()) - set(order))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; dvc.yaml has {order}")
    chosen = [s for s in order if not stages or s in stages]
    results = {}
    with tracking.pipeline_run(params, str(resolve_device(params.base.device))):
        for name in chosen:
            results[name] = stage_flow(name)(params_path=params_path)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m flows.pipeline`: check params and the store first, then run."""
    parser = argparse.ArgumentParser(description="Run the MESA pipeline as one Prefect flow.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stages", nargs="*", help="subset of stages (default: all)")
    args = parser.parse_args(argv)
    check_or_exit(args.params)
    try:
        pipeline(params_path=args.params, stages=args.stages)
    except Exception as err:
        sys.exit(f"error: pipeline failed: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
