"""Stage `validate`: Great Expectations gates on the raw data and the defender split."""

from __future__ import annotations

from prefect import flow

from tasks.common import catalog
from tasks.common.rawdata import resolve_archive
from tasks.pipeline import quality
from tasks.pipeline.stage import main, open_stage, publish
from tasks.pipeline.validate import gate_metrics, validate_data


@flow(name="validate")
def validate(params_path: str = "params.yaml") -> dict:
    """Stage validate: raw-data and split suites; a failed expectation stops the pipeline."""
    with open_stage("validate", params_path) as ctx:
        p = ctx.params.data
        summary = validate_data(ctx.params, resolve_archive(catalog.DATA_DIR, p.archive, p.name))
        metrics = publish(ctx.run, "validate", gate_metrics(summary))
        quality.raise_on_failure(summary)
        return metrics


FLOW = validate

if __name__ == "__main__":
    main(FLOW)
