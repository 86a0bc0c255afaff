"""Data-quality gates with Great Expectations (ephemeral context); the only GX importer.

Three suites:
    raw data     shapes, dtype, pixel range, non-blank images, label set, per-class counts
    splits       training subset / defender / held-out sizes, no overlap, test set covered
    poisoned set measured poison rate within tolerance of the parameter; labels and images
                 changed only at the recorded indices; changed labels only to the target

Each suite validates a small pandas frame of per-image facts (computed with torch, so 60,000
images take a fraction of a second). `check()` writes every result to one JSON artifact (plus
Data Docs HTML when asked) and returns a summary; `raise_on_failure()` then stops the pipeline
with the failing expectations named.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from tasks.common.env import apply_defaults

apply_defaults()  # GX_ANALYTICS_ENABLED=false before great_expectations is imported

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402


class QualityError(RuntimeError):
    """A data-quality expectation failed; the message names suite, expectation and column."""


@dataclass
class Suite:
    """A named frame and the expectations it must meet."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- frames


def image_facts(images: Tensor, labels: Tensor, split: str) -> pd.DataFrame:
    """One row per image: split, label, dtype, C, H, W, pixel min / max / std."""
    n = len(images)
    flat = images.reshape(n, -1) if n else images.reshape(0, 1)
    shape = tuple(images.shape[1:]) + (0,) * (3 - len(images.shape[1:]))
    return pd.DataFrame({
        "split": [split] * n,
        "label": labels.cpu().numpy(),
        "dtype": [str(images.dtype).removeprefix("torch.")] * n,
        "channels": [shape[0]] * n, "height": [shape[1]] * n, "width": [shape[2]] * n,
        "pixel_min": flat.amin(1).double().numpy() if n else [],
        "pixel_max": flat.amax(1).double().numpy() if n else [],
        "pixel_std": flat.double().std(1).numpy() if n else [],
    })


def raw_suites(splits: dict[str, tuple[Tensor, Tensor]], num_classes: int,
               class_balance: float) -> list[Suite]:
    """Suites of the raw data: per-image checks and per-class counts of each split.

    Args:
        splits: name -> (uint8 images (N, 3, 32, 32), int64 labels (N,)), e.g. raw train/test.
        num_classes: K; labels must lie in 0..K-1 and every class must be present.
        class_balance: each class count must lie within this share of N / K.
    """
    facts = pd.concat([image_facts(x, y, s) for s, (x, y) in splits.items()], ignore_index=True)
    images = Suite("raw_images", facts, [
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[32]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[32]),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        # A decoding bug shows as blank images; a few flat images are legitimate.
        gxe.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=1.0, mostly=0.995),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes))),
    ])
    rows = []
    for split, (_, y) in splits.items():
        counts = torch.bincount(y.cpu(), minlength=num_classes)[:num_classes]
        expected = len(y) / num_classes
        rows += [{"split": split, "label": k, "count": int(c),
                  "ratio_to_uniform": float(c) / expected if expected else 0.0}
                 for k, c in enumerate(counts)]
    counts = Suite("raw_class_counts", pd.DataFrame(rows), [
        gxe.ExpectTableRowCountToEqual(value=num_classes * len(splits)),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="ratio_to_uniform", min_value=1 - class_balance,
                                          max_value=1 + class_balance),
    ])
    return [images, counts]


def split_suite(sizes: dict[str, int], expected: dict[str, int], overlap: int,
                uncovered: int) -> Suite:
    """Suite of the defender split: each part has its configured size, parts are disjoint.

    Args:
        sizes / expected: part name -> actual / configured number of images.
        overlap: images shared by the defender and held-out parts (must be 0).
        uncovered: test images in neither part (must be 0).
    """
    frame = pd.DataFrame({
        "part": list(sizes), "size": [sizes[k] for k in sizes],
        "expected_size": [expected[k] for k in sizes],
        "defender_heldout_overlap": overlap, "test_images_uncovered": uncovered,
    })
    return Suite("splits", frame, [
        gxe.ExpectColumnPairValuesToBeEqual(column_A="size", column_B="expected_size"),
        gxe.ExpectColumnValuesToBeInSet(column="defender_heldout_overlap", value_set=[0]),
        gxe.ExpectColumnValuesToBeInSet(column="test_images_uncovered", value_set=[0]),
    ])


def poison_suite(clean_labels: Tensor, labels: Tensor, image_changed: Tensor, recorded: Tensor,
                 target: int, measured_rate: float, rate: float, tolerance: float,
                 name: str = "poisoned_set") -> list[Suite]:
    """Suites of a poisoned training set (or of the batches an injection attack poisoned).

    Args:
        clean_labels, labels: int64 (N,) labels before and after poisoning.
        image_changed: bool (N,) whether each image differs from its clean version.
        recorded: bool (N,) whether the attack recorded the row as poisoned.
        target: the attack's target class.
        measured_rate / rate / tolerance: the realised poison rate must lie within `tolerance`
            of the configured `rate`.
    """
    changed = labels != clean_labels
    frame = pd.DataFrame({
        "clean_label": clean_labels.numpy(), "label": labels.numpy(),
        "label_changed_unrecorded": (changed & ~recorded).numpy(),
        "image_changed_unrecorded": (image_changed & ~recorded).numpy(),
        "new_label_where_changed": torch.where(changed, labels, -1).numpy(),
        "label_where_recorded": torch.where(recorded, labels, -1).numpy(),
    })
    rows = Suite(name, frame, [
        gxe.ExpectColumnValuesToBeInSet(column="label_changed_unrecorded", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="image_changed_unrecorded", value_set=[False]),
        gxe.ExpectColumnValuesToBeInSet(column="new_label_where_changed", value_set=[-1, target]),
        gxe.ExpectColumnValuesToBeInSet(column="label_where_recorded", value_set=[-1, target]),
    ])
    low, high = round(max(0.0, rate - tolerance), 10), round(min(1.0, rate + tolerance), 10)
    rate_frame = pd.DataFrame({"measured_rate": [measured_rate], "configured_rate": [rate]})
    rates = Suite(f"{name}_rate", rate_frame, [
        gxe.ExpectColumnValuesToBeBetween(column="measured_rate", min_value=low, max_value=high),
    ])
    return [rows, rates]


# --------------------------------------------------------------------------- running


def _docs_site(context: Any, docs_dir: Path) -> None:
    context.add_data_docs_site(site_name="mesa", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })


def _describe(result: Any, suite: str) -> dict[str, Any]:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
    res = dict(result.result or {})
    return {"suite": suite, "expectation": cfg.type, "kwargs": kwargs,
            "success": bool(result.success),
            "observed_value": res.get("observed_value"),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_examples": list(res.get("partial_unexpected_list") or [])[:5]}


def check(suites: list[Suite], out_json: Path, docs_dir: Path | None = None) -> dict[str, Any]:
    """Validate every suite; write all results to `out_json` (+ Data Docs); return a summary.

    Returns:
        {"success": bool, "evaluated": int, "failed": [result, ...], "results": [...]} where each
        result names its suite, expectation type and kwargs (column, bounds).
    """
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)
        docs_dir.mkdir(parents=True)
        _docs_site(context, docs_dir)
    source = context.data_sources.add_pandas("mesa")
    definitions, frames = [], {}
    for suite in suites:
        batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe("all")
        gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name))
        for expectation in suite.expectations:
            gx_suite.add_expectation(expectation)
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=gx_suite)))
        frames[suite.name] = suite.frame
    results = []
    for definition in definitions:  # one frame per suite: run each with its own dataframe
        outcome = definition.run(batch_parameters={"dataframe": frames[definition.name]},
                                 result_format="SUMMARY")
        results += [_describe(r, definition.name) for r in outcome.results]
    if docs_dir is not None:
        context.build_data_docs(site_names=["mesa"])
    summary = {"success": all(r["success"] for r in results), "evaluated": len(results),
               "failed": [r for r in results if not r["success"]], "results": results}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def failure_message(summary: dict[str, Any]) -> str:
    """One line per failed expectation: suite, expectation type, its arguments, what was seen."""
    lines = []
    for r in summary["failed"]:
        args = ", ".join(f"{k}={v!r}" for k, v in r["kwargs"].items())
        seen = (f"{r['unexpected_count']} unexpected, e.g. {r['unexpected_examples']}"
                if r["unexpected_count"] is not None else f"observed {r['observed_value']!r}")
        lines.append(f"{r['suite']}: {r['expectation']}({args}) failed: {seen}")
    return "data quality gate failed:\n" + "\n".join(lines)


def raise_on_failure(summary: dict[str, Any]) -> None:
    """Stop the pipeline if any expectation failed, naming each failing one."""
    if not summary["success"]:
        raise QualityError(failure_message(summary))
