"""Set-up step (not a DVC stage): put one raw CIFAR archive into data/ for `dvc add data`."""

from __future__ import annotations

import sys

from prefect import flow

from tasks.common.params import ConfigError, load_params
from tasks.pipeline.data import fetch_raw


@flow(name="fetch-data")
def fetch(params_path: str = "params.yaml") -> str:
    """Fill data/ from MESA_DATA_SOURCE, the canonical download, or the offline copy."""
    return str(fetch_raw(name=load_params(params_path).data.name))


if __name__ == "__main__":
    try:
        load_params("params.yaml")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print(fetch())
