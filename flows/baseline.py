"""Stage `baseline`: the single-point baseline, recovered and repaired (sibling of MESA)."""

from __future__ import annotations

from prefect import flow

from tasks.pipeline.baseline import point_baseline
from tasks.pipeline.registry import register
from tasks.pipeline.stage import main, open_stage, publish


@flow(name="baseline")
def baseline(params_path: str = "params.yaml") -> dict:
    """Stage baseline: K point triggers -> artifacts/baseline/{triggers,repaired}."""
    with open_stage("baseline", params_path) as ctx:
        metrics = publish(ctx.run, "baseline", point_baseline(ctx.params, ctx.device, ctx.run))
        register(ctx.run, ctx.params, "baseline_repaired",
                 "mesa-backdoored model repaired with single-point baseline triggers")
        return metrics


FLOW = baseline

if __name__ == "__main__":
    main(FLOW)
