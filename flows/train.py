"""Stage `train`: the backdoored classifier, registered as a version of mesa-backdoored."""

from __future__ import annotations

from prefect import flow

from tasks.pipeline import quality
from tasks.pipeline.registry import register
from tasks.pipeline.stage import main, open_stage, publish
from tasks.pipeline.train import train_backdoored


@flow(name="train")
def train(params_path: str = "params.yaml") -> dict:
    """Stage train: poisoned set -> artifacts/train/backdoored.{safetensors,json}."""
    with open_stage("train", params_path) as ctx:
        result = train_backdoored(ctx.params, ctx.device, ctx.run)
        metrics = publish(ctx.run, "train", result["metrics"])
        quality.raise_on_failure(result["quality"])
        register(ctx.run, ctx.params, "backdoored",
                 "CIFAR classifier with a backdoor planted by the poison stage")
        return metrics


FLOW = train

if __name__ == "__main__":
    main(FLOW)
