"""Great Expectations gates: pass on good data, fail naming the expectation on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mesa_lib.poison import build_attack
from mesa_lib.triggers import DEMO_PATTERN, pattern_trigger
from tasks.pipeline import quality
from tasks.pipeline.quality import QualityError


def _data(n: int = 200, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.arange(n) % classes)


def _poisoned(target: int = 0, rate: float = 0.1):
    x, y = _data()
    attack = build_attack("badnets", trigger=pattern_trigger(DEMO_PATTERN), target=target,
                          seed=0, rate=rate, location="random")
    p = attack.poison_dataset(x, y)
    recorded = torch.zeros(len(y), dtype=torch.bool)
    recorded[p.indices] = True
    changed = (p.images != x).flatten(1).any(1)
    measured = len(p.indices) / int((y != target).sum())
    return y, p, changed, recorded, measured


def test_raw_and_split_suites_pass(tmp_path: Path) -> None:
    x, y = _data()
    suites = quality.raw_suites({"train": (x, y), "test": (x[:100], y[:100])}, 10, 0.05)
    suites.append(quality.split_suite({"defender": 80, "heldout": 20},
                                      {"defender": 80, "heldout": 20}, 0, 0))
    summary = quality.check(suites, tmp_path / "gx.json", tmp_path / "docs")
    assert summary["success"] and summary["evaluated"] == 15
    assert json.loads((tmp_path / "gx.json").read_text())["success"] is True
    assert (tmp_path / "docs" / "index.html").is_file()
    quality.raise_on_failure(summary)  # no error


def test_failing_expectation_is_named(tmp_path: Path) -> None:
    x, y = _data()
    y[3] = 11  # a label outside 0..9
    summary = quality.check(quality.raw_suites({"train": (x, y)}, 10, 0.5), tmp_path / "gx.json")
    assert not summary["success"]
    with pytest.raises(QualityError) as info:
        quality.raise_on_failure(summary)
    text = str(info.value)
    assert "raw_images: expect_column_values_to_be_in_set(column='label'" in text
    assert "1 unexpected, e.g. [11]" in text
    saved = json.loads((tmp_path / "gx.json").read_text())
    assert [r["expectation"] for r in saved["failed"]] == ["expect_column_values_to_be_in_set"]


def test_blank_images_and_class_imbalance_fail(tmp_path: Path) -> None:
    x, y = _data()
    x[:20] = 0  # 10% blank images
    y[y == 3] = 4  # class 3 vanishes
    summary = quality.check(quality.raw_suites({"train": (x, y)}, 10, 0.2), tmp_path / "gx.json")
    failed = {(r["suite"], r["kwargs"].get("column")) for r in summary["failed"]}
    assert ("raw_images", "pixel_std") in failed
    assert ("raw_class_counts", "ratio_to_uniform") in failed
    assert ("raw_class_counts", "count") in failed


def test_split_sizes_and_overlap(tmp_path: Path) -> None:
    suite = quality.split_suite({"defender": 79, "heldout": 21}, {"defender": 80, "heldout": 20},
                                overlap=1, uncovered=0)
    text = quality.failure_message(quality.check([suite], tmp_path / "gx.json"))
    assert "expect_column_pair_values_to_be_equal(column_A='size', column_B='expected_size')" \
        in text
    assert "defender_heldout_overlap" in text


def test_badnets_poisoned_set_passes(tmp_path: Path) -> None:
    y, p, changed, recorded, measured = _poisoned()
    suites = quality.poison_suite(y, p.labels, changed, recorded, 0, measured, 0.1, 0.005)
    assert quality.check(suites, tmp_path / "gx.json")["success"]


def test_poisoned_set_tampering_is_caught(tmp_path: Path) -> None:
    y, p, changed, recorded, measured = _poisoned()
    labels = p.labels.clone()
    outside = int((~recorded).nonzero()[0])
    labels[outside] = (int(y[outside]) + 1) % 10  # a label changed where nothing was recorded
    inside = int(p.indices[0])
    labels[inside] = 1 if int(y[inside]) != 1 else 2  # recorded, relabelled, not to the target
    suites = quality.poison_suite(y, labels, changed, recorded, 0, measured, 0.3, 0.01)
    failed = {(r["suite"], r["kwargs"]["column"])
              for r in quality.check(suites, tmp_path / "gx.json")["failed"]}
    assert failed == {("poisoned_set", "label_changed_unrecorded"),
                      ("poisoned_set", "new_label_where_changed"),
                      ("poisoned_set", "label_where_recorded"),
                      ("poisoned_set_rate", "measured_rate")}
