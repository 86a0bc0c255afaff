"""MLflow audit trail: nested runs and tags, same metrics as DVC, registry lineage, down server."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from pipeline_fixture import ROOT, make_project

from mesa_lib.modelio import Manifest, model_fingerprint, save_model
from mesa_lib.models import CIFAR10_MEAN, CIFAR10_STD, build_model
from tasks.common import catalog, tracking
from tasks.common.params import load_params
from tasks.common.tracking import TrackingError


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny project as working directory with a temporary SQLite MLflow store."""
    root = make_project(tmp_path / "project")
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MESA_PIPELINE_RUN_ID", raising=False)
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_tiny_model(artifact: str, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = build_model("resnet8", 10)
    manifest = Manifest("resnet8", 10, tuple(str(i) for i in range(10)), CIFAR10_MEAN,
                        CIFAR10_STD, arch_kwargs={"width": 1})
    save_model(model, catalog.path(artifact), manifest)


def test_down_server_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is not reachable"):
        tracking.preflight()
    assert time.perf_counter() - start < 5


def test_stage_runs_nest_under_one_parent_with_tags(store: str) -> None:
    params = load_params("params.yaml")
    with tracking.pipeline_run(params, "cpu") as parent:
        with tracking.stage_run("train", params, "cpu") as run:
            metrics = {"clean_accuracy": 0.5, "asr": {"original": 0.9}}
            tracking.epoch_logger(run, "poisoned")(1, {"loss": 2.0})
            tracking.log_final(run, metrics)
        with tracking.stage_run("repair", params, "cpu") as second:
            pass
    assert run.parent_id == second.parent_id == parent
    c = tracking.client()
    got = c.get_run(run.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent
    assert got.data.metrics == {"clean_accuracy": 0.5, "asr.original": 0.9,
                                "poisoned.loss": 2.0}
    assert json.loads(got.data.tags["mesa.metrics"]) == metrics
    assert got.data.params["train.lr"] == str(params.train.lr)
    assert "recover.alpha" not in got.data.params  # only the groups dvc.yaml gives the stage
    for tag in ("git.commit", "git.dirty", "data.md5", "device", "params.hash",
                "version.torch", "version.mlflow"):
        assert got.data.tags[tag], tag
    assert c.get_run(parent).info.status == "FINISHED"
    assert len(c.get_run(parent).data.params) > 50  # the parent holds every param


def test_failed_stage_marks_runs_failed(store: str) -> None:
    params = load_params("params.yaml")
    with pytest.raises(RuntimeError), tracking.stage_run("data", params, "cpu") as run:
        raise RuntimeError("boom")
    c = tracking.client()
    assert c.get_run(run.run_id).info.status == "FAILED"
    assert c.get_run(run.parent_id).info.status == "FAILED"


def test_registered_models_carry_lineage(store: str) -> None:
    from tasks.pipeline.registry import register, tag_verdicts

    params = load_params("params.yaml")
    _save_tiny_model("backdoored", 0)
    _save_tiny_model("repaired", 1)
    with tracking.pipeline_run(params, "cpu"):
        with tracking.stage_run("train", params, "cpu") as run:
            first = register.fn(run, params, "backdoored", "test backdoored model")
        with tracking.stage_run("repair", params, "cpu") as run:
            second = register.fn(run, params, "repaired", "test repaired model")
    assert first == f"{tracking.BACKDOORED}/1" and second == f"{tracking.REPAIRED}/1"
    tags = tracking.model_version_tags(tracking.REPAIRED, "1")
    assert tags["parent_model_version"] == f"{tracking.BACKDOORED}/1"
    assert tags["data_hash"] == "untracked"  # no data.dvc in the tiny project
    assert tags["params_hash"] == params.digest("base", "data", "poison", "train", "recover",
                                                "repair")
    assert tags["model_sha256"] == model_fingerprint(catalog.path("repaired"))
    assert tags["scan_verdict"] == "not scanned"
    assert tracking.model_version_tags(tracking.BACKDOORED, "1")["parent_model_version"] == "none"

    # the evaluate stage tags verdicts in the scan service's format (tasks.common.verdicts)
    registered = {"mesa": tracking.REPAIRED, "backdoored": tracking.BACKDOORED}
    verdicts = {"mesa": {"status": "clean", "target": None, "confidence": 0.8, "reason": "",
                         "model_sha256": tags["model_sha256"]},
                "backdoored": {"status": "backdoored", "target": 0, "confidence": 0.93,
                               "reason": "class 0 is hijacked",
                               "model_sha256": model_fingerprint(catalog.path("backdoored"))}}
    assert tag_verdicts.fn(verdicts, registered, run) == {
        "mesa": f"{tracking.REPAIRED}/1", "backdoored": f"{tracking.BACKDOORED}/1"}
    clean = tracking.model_version_tags(tracking.REPAIRED, "1")
    assert (clean["scan_verdict"], clean["scan_target"], clean["scan_confidence"]) == \
        ("clean", "", "0.800")
    assert clean["scan_run_id"] == run.run_id and "quarantined" not in clean
    bad = tracking.model_version_tags(tracking.BACKDOORED, "1")
    assert (bad["scan_verdict"], bad["scan_target"], bad["quarantined"]) == \
        ("backdoored", "0", "true")
    assert bad["scan_reason"] == "class 0 is hijacked"
    files = {Path(f.path).name for f in tracking.client().list_artifacts(
        tracking.client().get_model_version(tracking.REPAIRED, "1").run_id, "model")}
    assert files == {"repaired.safetensors", "repaired.json"}


def test_an_explicit_parent_is_joined_and_closed_by_its_opener(
        store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/run_pipeline.sh: `open` before dvc repro, stages join, `close` attaches dvc.lock."""
    params = load_params("params.yaml")
    parent = tracking.open_pipeline(params, "cpu")
    monkeypatch.setenv("MESA_PIPELINE_RUN_ID", parent)
    with tracking.stage_run("data", params, "cpu") as first:
        pass
    with tracking.stage_run("train", params, "cpu") as second:
        pass
    c = tracking.client()
    assert first.parent_id == second.parent_id == parent
    assert c.get_run(parent).info.status == "RUNNING"  # the stages leave it to its opener
    lock = Path("dvc.lock")
    lock.write_text("schema: '2.0'\n")
    tracking.close_pipeline(parent, "FINISHED", (lock,))
    assert c.get_run(parent).info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(parent, "dvc")] == ["dvc/dvc.lock"]
    monkeypatch.setenv("MESA_PIPELINE_RUN_ID", "no-such-run")
    with pytest.raises(TrackingError, match="MESA_PIPELINE_RUN_ID=no-such-run is not a run"):
        with tracking.stage_run("data", params, "cpu"):
            pass


def test_stages_of_one_dvc_experiment_share_a_parent(store: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `dvc exp run` DVC names the experiment; without it each stage stands alone."""
    params = load_params("params.yaml")
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lynx")
    with tracking.stage_run("data", params, "cpu") as first:
        pass
    with tracking.stage_run("train", params, "cpu") as second:
        pass
    assert first.parent_id == second.parent_id
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.stage_run("data", params, "cpu") as alone:
        pass
    assert alone.parent_id != first.parent_id
    assert tracking.client().get_run(alone.parent_id).info.status == "FINISHED"
    assert (ROOT / "dvc.yaml").exists()
