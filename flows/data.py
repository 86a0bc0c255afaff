"""Stage `data`: decode the raw archive in data/, subset the training set, split the test set."""

from __future__ import annotations

from prefect import flow

from tasks.common import catalog, tracking
from tasks.common.rawdata import resolve_archive
from tasks.pipeline.data import prepare_dataset
from tasks.pipeline.stage import main, open_stage, publish


@flow(name="data")
def data(params_path: str = "params.yaml") -> dict:
    """Stage data: raw archive -> artifacts/data/dataset.npz (train / defender / held-out)."""
    with open_stage("data", params_path) as ctx:
        p = ctx.params.data
        archive = resolve_archive(catalog.DATA_DIR, p.archive, p.name)
        metrics, tags = prepare_dataset(ctx.params, archive)
        tracking.set_tags(ctx.run, tags)
        return publish(ctx.run, "data", metrics)


FLOW = data

if __name__ == "__main__":
    main(FLOW)
