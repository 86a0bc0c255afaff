"""Stage `evaluate`: held-out accuracy and ASR per trigger; scan verdicts into the registry."""

from __future__ import annotations

from prefect import flow, task

from tasks import tracking
from tasks.evaluate import evaluate_models
from tasks.stage import main, open_stage, publish

REGISTERED = {"backdoored": tracking.BACKDOORED, "mesa": tracking.REPAIRED}


@task(retries=2, retry_delay_seconds=2)
def tag_verdicts(verdicts: dict) -> dict[str, str]:
    """Write each scan verdict onto the registry version holding those exact weights."""
    tagged = {}
    for label, v in verdicts.items():
        version = tracking.find_model_version(REGISTERED[label], v["model_sha256"])
        if version:
            text = v["status"] + (f" (target {v['target']})" if v["target"] is not None else "")
            text += f", confidence {v['confidence']:.2f}"
            tracking.tag_model_version(REGISTERED[label], version, {"scan_verdict": text})
            tagged[label] = f"{REGISTERED[label]}/{version}"
    return tagged


@flow(name="evaluate")
def evaluate(params_path: str = "params.yaml") -> dict:
    """Stage evaluate: all models on the held-out images -> metrics, ASR table, scan verdicts."""
    with open_stage("evaluate", params_path) as ctx:
        result = evaluate_models(ctx.params, ctx.device)
        metrics = publish(ctx.run, "evaluate", result["metrics"])
        tag_verdicts(result["verdicts"])
        return metrics


FLOW = evaluate

if __name__ == "__main__":
    main(FLOW)
