"""The I/O around the pure core `mesa_lib`, one sub-package per product (docs/architecture.md).

- `tasks.common`: what every product shares: params (pydantic), the artifact catalog, file I/O,
  the MLflow audit trail (the only mlflow importer), Great Expectations gates (the only GX
  importer), the environment and the DVC stage graph.
- `tasks.pipeline`: the Prefect tasks of the reproduction pipeline's DVC stages.
- `tasks.scan`: the scan service: discovery, exactly-once claims, model checks, the scan core and
  the recording of verdicts.
"""
