"""Prefect tasks and the pipeline's edges: configuration, artifact catalog, tracking, data quality.

`mesa_lib` is the pure core (torch only); this package does the I/O around it. Only
`tasks.tracking` imports mlflow and only `tasks.quality` imports great_expectations.
"""
