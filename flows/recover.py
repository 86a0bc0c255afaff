"""Stage `recover`: the scan of the backdoored model, and MESA's model of the distribution of
triggers it accepts, for every flagged target."""

from __future__ import annotations

from prefect import flow

from tasks.pipeline.recover import fit_distribution
from tasks.pipeline.stage import main, open_stage, publish


@flow(name="recover")
def recover(params_path: str = "params.yaml") -> dict:
    """Stage recover: backdoored model + defender images -> artifacts/recover/recovered."""
    with open_stage("recover", params_path) as ctx:
        return publish(ctx.run, "recover", fit_distribution(ctx.params, ctx.device, ctx.run))


FLOW = recover

if __name__ == "__main__":
    main(FLOW)
