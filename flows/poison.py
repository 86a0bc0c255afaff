"""Stage `poison`: the attacker's training set and the poisoned-set quality gate."""

from __future__ import annotations

from prefect import flow

from tasks.pipeline import quality
from tasks.pipeline.poison import poison_training_set
from tasks.pipeline.stage import main, open_stage, publish


@flow(name="poison")
def poison(params_path: str = "params.yaml") -> dict:
    """Stage poison: artifacts/data/dataset.npz -> artifacts/poison/poisoned.npz (+ GX gate)."""
    with open_stage("poison", params_path) as ctx:
        metrics, summary = poison_training_set(ctx.params)
        publish(ctx.run, "poison", metrics)
        quality.raise_on_failure(summary)
        return metrics


FLOW = poison

if __name__ == "__main__":
    main(FLOW)
