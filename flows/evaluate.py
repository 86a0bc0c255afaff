"""Stage `evaluate`: held-out accuracy and ASR per trigger; scan verdicts into the registry."""

from __future__ import annotations

from prefect import flow

from tasks.common import tracking
from tasks.pipeline.evaluate import evaluate_models
from tasks.pipeline.registry import tag_verdicts
from tasks.pipeline.stage import main, open_stage, publish

REGISTERED = {"backdoored": tracking.BACKDOORED, "mesa": tracking.REPAIRED,
              "baseline": tracking.BASELINE_REPAIRED}


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict:
    """Stage evaluate: all models on the held-out images -> metrics, ASR table, scan verdicts."""
    with open_stage("evaluate", params_path) as ctx:
        result = evaluate_models(ctx.params, ctx.device)
        metrics = publish(ctx.run, "evaluate", result["metrics"])
        tag_verdicts(result["verdicts"], REGISTERED, ctx.run)
        return metrics


FLOW = evaluate

if __name__ == "__main__":
    main(FLOW)
