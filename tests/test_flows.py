"""The stage graph, dvc.yaml vs the catalog, and the whole flow chain on a tiny project."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from pipeline_fixture import ROOT, make_project, write_plumbing_calibration
from prefect.testing.utilities import prefect_test_harness

from tasks.common import catalog
from tasks.common import dvcgraph as dag
from tasks.common.params import Params

CHAIN = ["data", "validate", "poison", "train", "recover", "repair", "evaluate"]


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every flow test."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny project as the working directory, with its own MLflow SQLite store."""
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("MESA_PIPELINE_RUN_ID", raising=False)
    return root


# --------------------------------------------------------------------------- declarations


def test_dvc_outs_are_exactly_the_catalog() -> None:
    stages = dag.stages(ROOT)
    for name, stage in stages.items():
        expected = sorted(str(p) for a in catalog.of_stage(name) for p in a.files())
        assert sorted(stage.outs) == expected, name
    assert set(stages) == {a.stage for a in catalog.CATALOG.values()}
    for artifact in catalog.CATALOG.values():
        assert artifact.path.parts[0] == "artifacts"


def test_dvc_metrics_and_plots_match_catalog_roles() -> None:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, body in raw["stages"].items():
        assert body.get("metrics") == [str(catalog.metrics_path(name))]
        assert "plots" not in body  # CSVs are outs; the top-level plots section renders them
        assert body["cmd"] == f"python -m flows.{name}"
        assert f"flows/{name}.py" in body["deps"]
        assert f"tasks/pipeline/{name}.py" in body["deps"]
        for dep in body["deps"]:  # code deps exist in a clean clone; artifacts come from stages
            if not dep.startswith(("artifacts/", "data", "${")):
                assert (ROOT / dep).exists(), f"{name}: dependency {dep} does not exist"


def test_top_level_plots_cover_the_catalog_csvs() -> None:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    files = {f for entry in raw["plots"] for spec in entry.values() for f in spec["y"]}
    assert files == {str(a.path) for a in catalog.CATALOG.values() if a.role == "plots"}


def test_dvc_params_name_real_keys() -> None:
    groups = {f.alias or name: f.annotation for name, f in Params.model_fields.items()}
    for stage in dag.stages(ROOT).values():
        for key in stage.params:
            group, _, sub = key.partition(".")
            assert group in groups, key
            if sub:
                assert sub in groups[group].model_fields, key


def test_stage_order_comes_from_dvc_yaml() -> None:
    order = dag.stage_order(ROOT)
    assert [s for s in order if s in CHAIN] == CHAIN
    assert order.index("train") < order.index("baseline") < order.index("evaluate")
    for name in order:
        module = importlib.import_module(f"flows.{name}")
        assert module.FLOW.name == name


def test_repair_epochs_only_touches_repair_and_evaluate() -> None:
    """Which stages read repair.epochs, directly or through an upstream output."""
    stages = dag.stages(ROOT)
    direct = {n for n, s in stages.items() if "repair" in s.params or "repair.epochs" in s.params}
    affected = set(direct)
    for name in dag.stage_order(ROOT):
        if set(stages[name].upstream) & affected:
            affected.add(name)
    assert affected == {"repair", "evaluate"}


# --------------------------------------------------------------------------- the chain


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("mesa")
    return c.search_runs([exp.experiment_id])


def test_pipeline_flow_runs_every_stage(project: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline
    from tasks.common import tracking

    results = pipeline(params_path="params.yaml")
    assert list(results) == dag.stage_order()
    for artifact in catalog.CATALOG.values():
        for path in artifact.files():
            assert path.exists(), path
    for stage in results:
        assert json.loads(catalog.metrics_path(stage).read_text()) == results[stage]
    evaluation = results["evaluate"]
    assert set(evaluation) >= {"backdoored", "mesa", "baseline", "scan"}
    assert 0 <= evaluation["mesa"]["asr"] <= 1

    runs = _runs(tracking.tracking_uri())
    parents = [r for r in runs if r.data.tags.get("mesa.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(results)
    train = children["train"]
    assert "poisoned.loss" in train.data.metrics  # per-epoch metrics via the callback
    assert train.data.metrics["asr"] == pytest.approx(results["train"]["asr"])
    assert train.data.params["train.epochs"] == "1"
    for tag in ("git.commit", "git.dirty", "data.md5", "device", "version.torch"):
        assert tag in train.data.tags

    c = tracking.client()
    repaired = c.get_model_version(tracking.REPAIRED, "1")
    assert repaired.tags["parent_model_version"] == f"{tracking.BACKDOORED}/1"
    assert repaired.tags["scan_verdict"] != "not scanned"  # set by evaluate
    files = {Path(f.path).name for f in c.list_artifacts(repaired.run_id, "model")}
    assert files == {"repaired.safetensors", "repaired.json"}


@pytest.mark.parametrize("geometry", ["scan", "anywhere"])
def test_the_pipeline_repairs_what_its_own_scan_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None,
        geometry: str) -> None:
    """Not told the target: recover fits MESA for every class its scan flags (against a null
    so tight that the tiny model is flagged), in the recovered geometry or the paper's 3x3
    anywhere; repair and baseline verify on the same disjoint parts and record it; a stale
    record is refused."""
    from flows.pipeline import pipeline
    from flows.repair import repair

    root = make_project(tmp_path / "project", {"recover.geometry": geometry})
    write_plumbing_calibration(root / "params.yaml", root / "calibration.json", spread=1e-3,
                               floor=1e-3)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    results = pipeline(params_path="params.yaml")

    folder = catalog.path("recovered")
    found = json.loads((folder / "found.json").read_text())
    assert found["verdict"] == "backdoored" and found["targets"]
    assert sum(found["images"].values()) == 80
    for t in found["targets"]:
        assert (folder / f"target_{t}.safetensors").is_file()
        assert (folder / f"target_{t}.png").is_file()
        g = found["geometries"][str(t)]
        if geometry == "anywhere":
            assert (g["kind"], g["size"], g["location"]) == ("patch", [3, 3], None)
        else:
            assert g["kind"] in ("patch", "blend")
    for stage, name in (("repair", "repair_verification"), ("baseline", "baseline_verification")):
        record = json.loads(catalog.path(name).read_text())
        assert record["verdict"] in ("clean", "backdoored") and record["images"] == found["images"]
        assert [x["target"] for x in record["targets"]] == found["targets"]
        assert record["method"] == ("mesa" if stage == "repair" else "point")
        assert (record["verdict"] == "clean") == (record["reason"] == "")
        passed = results[stage]["verification"]["passed"]
        assert passed == int(record["verdict"] == "clean")
    triggers = json.loads((catalog.path("point_triggers") / "triggers.json").read_text())
    assert triggers["targets"] == found["targets"]

    g = found["geometries"][str(found["targets"][0])]  # a record the triggers no longer match
    g["size"] = [g["size"][0] + 1, g["size"][1]]
    (folder / "found.json").write_text(json.dumps(found))
    with pytest.raises(RuntimeError, match="found.json: the triggers recovered now"):
        repair(params_path="params.yaml")


def test_failed_expectation_stops_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           prefect_harness: None) -> None:
    from tasks.pipeline.quality import QualityError

    root = make_project(tmp_path / "skewed", overrides={"validate.class_balance": 0.1},
                        counts={"cat": 4})
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("MESA_PIPELINE_RUN_ID", raising=False)
    from flows.data import data
    from flows.validate import validate

    data(params_path="params.yaml")
    with pytest.raises(QualityError, match="raw_class_counts: expect_column_values_to_be_between"
                                           r"\(column='ratio_to_uniform'"):
        validate(params_path="params.yaml")
    saved = json.loads(catalog.path("raw_quality").read_text())
    assert saved["success"] is False
    runs = {r.info.run_name: r.info.status for r in _runs(f"sqlite:///{root / 'mlflow.db'}")}
    assert runs["validate"] == "FAILED" and runs["data"] == "FINISHED"


def test_an_attack_that_poisons_batches_is_injected_and_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    """poison.attack finetune_injection (the paper's): the poison stage stores the clean set,
    the train stage trains a clean model, then injects and checks every batch it poisoned."""
    root = make_project(tmp_path / "inject", overrides={
        "poison.attack": "finetune_injection", "poison.settings.finetune_injection.rate": 0.3,
        "train.inject_epochs": 1,
        # a tiny set: about 120 images a pass, so the measured rate is 0.3 +- 0.04 (1 sd)
        "validate.poison_rate_tolerance": 0.15})
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("MESA_PIPELINE_RUN_ID", raising=False)
    from flows.data import data
    from flows.poison import poison
    from flows.train import train
    from flows.validate import validate

    data(params_path="params.yaml")
    validate(params_path="params.yaml")
    assert poison(params_path="params.yaml")["poisoned"] == 0  # nothing static
    metrics = train(params_path="params.yaml")
    checked = json.loads(catalog.path("injection_quality").read_text())
    assert checked["success"] is True and checked["evaluated"] > 0
    assert metrics["injection_expectations_failed"] == 0 and 0 <= metrics["asr"] <= 1
    manifest = json.loads(catalog.path("backdoored").with_suffix(".json").read_text())
    assert manifest["extra"]["attack"] == "finetune_injection"
