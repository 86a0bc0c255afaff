"""Task of the `validate` stage: Great Expectations gates on the raw data and the splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task

from mesa_lib.data import load_cifar
from tasks.common import catalog
from tasks.common.env import CACHE_DIR
from tasks.common.io import load_npz
from tasks.common.params import NUM_CLASSES, Params
from tasks.pipeline import quality


@task
def validate_data(params: Params, archive: Path) -> dict[str, Any]:
    """Run the raw-data and split suites; write results (+ Data Docs); return the GX summary."""
    raw = load_cifar(archive, params.data.name, CACHE_DIR)  # served from the npz cache
    split = load_npz(catalog.path("dataset"))
    suites = quality.raw_suites(
        {"train": (raw.train.images, raw.train.labels), "test": (raw.test.images, raw.test.labels)},
        NUM_CLASSES[params.data.name], params.validate.class_balance)
    sizes = {k: len(split[f"{k}_index"]) for k in ("train", "defender", "heldout")}
    expected = {"train": params.data.n_train or len(raw.train), "defender": params.data.n_defender,
                "heldout": len(raw.test) - params.data.n_defender}
    defender, heldout = split["defender_index"], split["heldout_index"]
    overlap = int(torch.isin(defender, heldout).sum())
    uncovered = len(raw.test) - len(torch.unique(torch.cat([defender, heldout])))
    suites.append(quality.split_suite(sizes, expected, overlap, uncovered))
    docs = catalog.path("raw_data_docs")
    summary = quality.check(suites, catalog.path("raw_quality"),
                            docs if params.validate.data_docs else None)
    if not params.validate.data_docs:
        docs.mkdir(parents=True, exist_ok=True)
        (docs / "index.html").write_text("<p>Data Docs disabled (validate.data_docs: false)</p>\n")
    return summary


def gate_metrics(summary: dict[str, Any]) -> dict[str, int]:
    """Counts of a GX summary for the metrics JSON."""
    return {"expectations": summary["evaluated"], "failed": len(summary["failed"]),
            "passed": int(summary["success"])}
