"""Stage `repair`: fine-tune the backdoored model against MESA samples; register the result."""

from __future__ import annotations

from prefect import flow

from tasks.pipeline.registry import register
from tasks.pipeline.repair import repair_mesa
from tasks.pipeline.stage import main, open_stage, publish


@flow(name="repair")
def repair(params_path: str = "params.yaml") -> dict:
    """Stage repair: backdoored model + MESA distribution -> artifacts/repair/repaired."""
    with open_stage("repair", params_path) as ctx:
        metrics = publish(ctx.run, "repair", repair_mesa(ctx.params, ctx.device, ctx.run))
        register(ctx.run, ctx.params, "repaired",
                 "mesa-backdoored model repaired with triggers sampled from MESA")
        return metrics


FLOW = repair

if __name__ == "__main__":
    main(FLOW)
