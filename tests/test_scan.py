"""The scan service: discovery, exactly-once claims, verdicts on tiny models, hostile inputs,
down servers, and the Dask fan-out. Models: tests/fixtures/scan_models (see make_scan_models.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from backdoor_fixture import TARGET, synthetic_data
from foreign_fixture import hf_folder, onnx_net
from pipeline_fixture import write_scan_params
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file, save_file

from flows import scan as scan_flows
from mesa_lib.detectors import MesaDetectorConfig
from mesa_lib.modelio import Manifest, load_model, save_model
from mesa_lib.models import build_model
from tasks.common import tracking
from tasks.common.configs import scan_settings
from tasks.common.params import ConfigError, apply_overrides, load_params, params_from_dict
from tasks.common.tracking import TrackingError
from tasks.scan import check, discover, service
from tasks.scan.claims import ClaimStore, Ledger
from tasks.scan.core import load_calibration, measure_chunk, merge, verdict_of
from tasks.scan.discover import drop_groups, model_key
from tasks.scan.reference import chunks

MODELS = Path(__file__).parent / "fixtures" / "scan_models"
CPU = torch.device("cpu")
# Detection settings that find the tiny backdoor (seconds per model on 2 cores).
TUNED = {"scan.images": 1024, "scan.detectors.mask.steps": 200,
         "scan.detectors.mask.batch_size": 16, "repair.epochs": 1, "repair.batch_size": 64}
# Where the verdict does not matter: the cheapest scan.
FAST = {"scan.images": 64, "scan.detectors.mask.steps": 4, "scan.detectors.mask.batch_size": 8}
HF_ARCH = "mobilenetv3_small_050"  # a timm network small enough for 16 x 16 test images
@pytest.fixture(scope="module", autouse=True)
def harness():
    """One temporary Prefect API for the flow tests of this module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Working directory with a reference npz, a drop folder and a temporary MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MESA_PIPELINE_RUN_ID", raising=False)
    images, labels = synthetic_data(1024, 1)
    np.savez(tmp_path / "reference.npz", images=images.numpy(), labels=labels.numpy(),
             classes=np.array([f"class{k}" for k in range(6)]))
    (tmp_path / "drop").mkdir()
    write_params(tmp_path, FAST)
    return tmp_path


def write_params(root: Path, overrides: dict) -> Path:
    """Test params, and a plumbing calibration for exactly their scan settings (stated null)."""
    return write_scan_params(root, overrides)


def drop(root: Path, name: str, source: str = "clean", variant: str = "") -> None:
    """Copy a tiny model into the drop folder; `variant` makes its manifest (and key) unique."""
    shutil.copyfile(MODELS / f"{source}.safetensors", root / "drop" / f"{name}.safetensors")
    text = (MODELS / f"{source}.json").read_text()
    (root / "drop" / f"{name}.json").write_text(
        text.replace('"data_hash": ""', f'"data_hash": "{variant}"'))


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (a symlink as its target's name) -> its digest."""
    return {str(p.relative_to(folder)): str(p.readlink()) if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def scan_runs(root: Path) -> list:
    c = tracking.client()
    exp = c.get_experiment_by_name(tracking.SCAN_EXPERIMENT)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def versions(name: str) -> list[dict]:
    return [v for v in tracking.model_versions(("*",)) if v["name"] == name]


# --------------------------------------------------------------------------- claims, discovery


def _try_claim(root: str, key: str, barrier, out) -> None:
    barrier.wait()
    out.put(ClaimStore(Path(root)).acquire(key))


def test_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_try_claim, args=(str(tmp_path), "ab" * 32, barrier, out))
             for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(out.get(timeout=5) for _ in procs) == [False] * 7 + [True]


def test_stale_claims_are_taken_over_and_done_records_release(tmp_path: Path) -> None:
    store = ClaimStore(tmp_path, timeout_s=3600)
    assert store.acquire("aa") and not store.acquire("aa")  # live claim of this process
    dead = tmp_path / "claims" / "bb.claim"
    dead.write_text(f'{{"pid": 999999999, "host": "{socket.gethostname()}", "time": 0}}')
    assert store.acquire("bb")  # its owner is gone
    old = tmp_path / "claims" / "cc.claim"
    old.write_text('{"pid": 1, "host": "elsewhere", "time": 0}')
    assert not store.acquire("cc")
    os.utime(old, (0, 0))  # older than the timeout
    assert store.acquire("cc")
    store.finish("aa", {"status": "clean"})
    assert store.done("aa") == {"status": "clean"} and "aa" not in store.held()
    store.release("bb")
    assert store.held() == ["cc"]
    with pytest.raises(ValueError):
        store.acquire("../etc")


def test_a_scan_asked_for_waits_for_the_one_in_progress(tmp_path: Path) -> None:
    """`flows.scan model` on a version the service is scanning waits for that claim to go."""
    store = ClaimStore(tmp_path, timeout_s=30)
    assert store.acquire("dd")
    threading.Timer(0.5, store.release, args=("dd",)).start()
    start = time.monotonic()
    assert store.acquire_waiting("dd", poll_s=0.05)
    assert 0.4 < time.monotonic() - start < 20
    start = time.monotonic()  # "dd" is held again (live): the wait ends at the claim timeout
    assert ClaimStore(tmp_path, timeout_s=0.3).acquire_waiting("dd", poll_s=0.05)
    assert time.monotonic() - start >= 0.25


def test_drop_folder_grouping_settling_and_ledger(project: Path) -> None:
    d = project / "drop"
    drop(project, "a")
    (d / "a.data.npz").write_bytes(b"x")
    (d / "b.pt").write_bytes(b"\x80\x02.")
    (d / "c.json").write_text("{}")
    (d / ".hidden.safetensors").write_bytes(b"")
    (d / "copying.safetensors.part").write_bytes(b"")
    (d / "sub").mkdir()
    groups = drop_groups(d)
    assert sorted(groups) == ["a", "b.pt", "c"]
    assert len(groups["a"]) == 3
    params = load_params(project / "params.yaml")
    book = Ledger(project / "state" / "ledger.jsonl")
    from tasks.scan.discover import drop_candidates

    assert drop_candidates(params, book, settle_s=3600) == []  # all just written
    found = {c.label: c for c in drop_candidates(params, book)}
    assert set(found) == {"drop:a", "drop:b.pt", "drop:c"}
    a = found["drop:a"]
    assert a.key == model_key([Path(f) for f in a.files])[0] and len(a.weights_sha256) == 64
    book.append({"files": [list(s) for s in a.stats], "key": a.key})
    assert {c.label for c in drop_candidates(params, book)} == {"drop:b.pt", "drop:c"}


def test_scan_settings_are_validated(project: Path) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="scan.interval_s: expected > 0 when scan.cron"):
        params_from_dict(apply_overrides(raw, {"scan.interval_s": 0, "scan.cron": ""}))
    with pytest.raises(ConfigError, match="scan.task_runner"):
        params_from_dict(apply_overrides(raw, {"scan.task_runner": "spark"}))
    assert chunks(10, 3) == [(0, 1, 2), (3, 4, 5, 6), (7, 8, 9)] and chunks(2, 5) == [(0,), (1,)]


def test_a_chunk_measured_twice_gives_the_same_evidence_and_chunks_cover_the_model(
        project: Path) -> None:
    """A retried chunk task is deterministic; chunks merge into one score per detector."""
    params = load_params(project / "params.yaml")
    base = scan_settings(params)
    mesa = MesaDetectorConfig(epochs=1, batch_size=16, hidden=16, eval_images=32)
    settings = replace(base, detectors={**base.detectors, "mesa": mesa})
    model, _ = load_model(MODELS / "backdoored")
    x, y = synthetic_data(128, 1)
    first, again = (measure_chunk(model, x, y, (3, 4, 5), settings, CPU, keep=2)
                    for _ in range(2))
    assert first.evidence == again.evidence and set(first.evidence) == {"mask", "mesa"}
    assert len(first.samples["mesa"][3]) == 2
    parts = [measure_chunk(model, x, y, part, settings, CPU) for part in chunks(6, 2)]
    merged = merge(parts)
    assert set(merged) == {"mask", "mesa"}
    assert sorted(merged["mask"].per_class) == list(range(6))


@pytest.mark.slow
def test_two_chunk_scan_names_the_same_target_as_one_chunk(project: Path) -> None:
    """Chunks are separate fits (scores differ a little) yet the verdict is the same (~1 min)."""
    path = write_params(project, TUNED)
    params = load_params(path)
    settings, cal = scan_settings(params), load_calibration(project / "calibration.json",
                                                            scan_settings(params))
    model, _ = load_model(MODELS / "backdoored")
    x, y = synthetic_data(1024, 1)
    whole = verdict_of([measure_chunk(model, x, y, tuple(range(6)), settings, CPU)], cal)
    split = verdict_of([measure_chunk(model, x, y, part, settings, CPU)
                        for part in chunks(6, 2)], cal)
    assert (whole.status, whole.target) == (split.status, split.target) == ("backdoored", TARGET)


# --------------------------------------------------------------------------- verdicts


def test_backdoored_and_clean_drops_get_verdicts_evidence_and_repair(project: Path) -> None:
    # a repair that cannot work (its learning rate moves nothing): never cleared, never signed
    write_params(project, {**TUNED, "scan.images": 512, "scan.repair": True,
                           "repair.method": "unlearn", "repair.lr": 1e-9})
    drop(project, "suspect", "backdoored")
    drop(project, "honest", "clean")
    before = folder_digest(project / "drop")
    result = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    by_label = {o["label"]: o for o in result["scanned"]}
    bad, good = by_label["drop:suspect"], by_label["drop:honest"]
    assert (bad["status"], bad["target"]) == ("backdoored", TARGET), bad
    assert (good["status"], good["target"]) == ("clean", None), good
    assert folder_digest(project / "drop") == before  # the drop folder is only read
    name = "mesa-dropped"
    tags = {v["version"]: v["tags"] for v in versions(name)}
    bad_v, good_v = bad["model_version"].split("/")[1], good["model_version"].split("/")[1]
    assert tags[bad_v]["scan_verdict"] == "backdoored" and tags[bad_v]["quarantined"] == "true"
    assert tags[bad_v]["scan_target"] == str(TARGET) and tags[bad_v]["scan_run_id"] == bad["run_id"]
    assert tags[good_v]["scan_verdict"] == "clean" and "quarantined" not in tags[good_v]
    # repair: a new version with lineage to the quarantined one; its verification failed, so
    # it is quarantined with the reason and carries no signature of ours
    repaired = bad["repaired_version"].split("/")[1]
    assert tags[repaired]["parent_model_version"] == bad["model_version"]
    assert tags[bad_v]["repaired_version"] == bad["repaired_version"]
    assert bad["repaired_verdict"] == tags[repaired]["scan_verdict"] == "backdoored"
    assert tags[repaired]["quarantined"] == "true" and tags[repaired]["repair_verdict"] == \
        "backdoored"
    assert tags[repaired]["scan_reason"].startswith("repair failed verification: ")
    assert tags[repaired]["signature"].startswith("not signed: repair failed verification")
    assert "signature_file" not in tags[repaired]
    assert json.loads(tags[repaired]["repair_images"])["verification"] >= 20
    # the audit record a person reads shows the repair's before/after and settings
    text = tracking.client().get_model_version(name, repaired).description
    assert "- repair: unlearn; verification: FAILED on " in text, text
    assert re.search(rf"class {TARGET}: recovered trigger's ASR \d+\.\d% -> \d+\.\d%", text), text
    assert "clean accuracy " in text and "lr 1e-09" in text, text
    run_of = {v["version"]: v["run_id"] for v in versions(name)}
    assert not any(f.path.endswith(".sig")
                   for f in tracking.client().list_artifacts(run_of[repaired], "model"))
    # evidence in the scan run
    c = tracking.client()
    run = c.get_run(bad["run_id"])
    assert run.data.tags["scan_verdict"] == "backdoored"
    assert run.data.metrics[f"class.mask.{TARGET}.mask_asr"] > 0.3
    assert "seconds.fit_sum" in run.data.metrics
    assert run.data.metrics["p_value"] <= 0.2 and "detector.mask.statistic" in run.data.metrics
    assert tags[bad_v]["scan_detector"] in ("mask", "mesa")
    assert float(tags[bad_v]["scan_p_value"]) <= 0.2
    files = {a.path for a in c.list_artifacts(bad["run_id"], "evidence")}
    assert {"evidence/verdict.json", "evidence/scores.csv", "evidence/triggers.png"} <= files
    # the next run finds nothing new: each model is scanned once
    again = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    assert again["scanned"] == [] and len(scan_runs(project)) == 3  # 2 scans + 1 repair
    # the same files registered elsewhere get the verdict without a second scan
    upload = tracking.start_run("upload", {}, experiment="uploads")
    tracking.register_model(upload, (project / "drop" / "suspect.safetensors",
                                     project / "drop" / "suspect.json"), "someone-else",
                            {"scan_verdict": "not scanned"}, "the same suspect files")
    twin = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    assert twin["scanned"] == [] and twin["reused"] == ["registry:someone-else/1"]
    assert versions("someone-else")[0]["tags"]["quarantined"] == "true"


def test_a_model_outside_the_calibration_is_held_not_cleared(project: Path) -> None:
    """The calibration covers other architectures: verdict `uncalibrated`, scores kept, the
    version quarantined, not repaired, not signed."""
    write_params(project, {**FAST, "scan.repair": True})
    calibration = json.loads((project / "calibration.json").read_text())
    calibration["provenance"]["coverage"] = {"architectures": ["resnet20"]}
    (project / "calibration.json").write_text(json.dumps(calibration))
    drop(project, "foreign", "clean")
    result = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    (out,) = result["scanned"]
    assert out["status"] == "uncalibrated" and "repaired_version" not in out, out
    (v,) = versions("mesa-dropped")
    assert v["tags"]["scan_verdict"] == "uncalibrated" and v["tags"]["quarantined"] == "true"
    assert "architecture 'resnet8' is not among" in v["tags"]["scan_reason"]
    assert v["tags"]["signature"].startswith("not signed: verdict uncalibrated")
    run = tracking.client().get_run(out["run_id"])
    assert run.data.metrics["uncalibrated"] == 1.0 and "detector.mask.statistic" in \
        run.data.metrics


def test_models_that_are_not_ours_are_scanned_and_registered_as_they_came(project: Path
                                                                         ) -> None:
    """An ONNX file and a Hugging Face / timm folder in the drop folder, and a folder registered
    by someone, go the same way as a pair: checked, scanned, registered with their own files
    and, cleared, signed (a re-scan of what we registered finds our signature); a folder with a
    nesting-bomb config.json or a symbolic link is refused naming the file."""
    write_params(project, FAST)
    calibration = json.loads((project / "calibration.json").read_text())
    calibration["provenance"]["coverage"] = {"architectures": ["onnx", f"timm:{HF_ARCH}"]}
    calibration["alpha"] = 1e-9  # no p-value is that small: cleared, so signed
    (project / "calibration.json").write_text(json.dumps(calibration))
    onnx_net(project / "drop" / "net.onnx", side=16, classes=6)
    config = {"architecture": HF_ARCH, "num_classes": 6,
              "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3}}
    hf_folder(project / "drop" / "hf", config)
    bomb = hf_folder(project / "drop" / "bomb", config)
    (bomb / "config.json").write_text("[" * 100 + "]" * 100)
    linked = hf_folder(project / "drop" / "linked", config)
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(project / "drop" / "hf" / "config.json")
    upload = hf_folder(project / "upload" / "model", {**config, "label_names": ["a"] * 6})
    run = tracking.start_run("upload", {}, experiment="uploads")
    tracking.register_model(run, tuple(sorted(upload.iterdir())), "uploaded-hf",
                            {"scan_verdict": "not scanned"}, "someone's folder")
    before = folder_digest(project / "drop")
    result = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    by_label = {o["label"]: o for o in result["scanned"]}
    for label in ("drop:net", "drop:hf", "registry:uploaded-hf/1"):
        assert by_label[label]["status"] == "clean", by_label[label]
    assert "bomb/config.json: manifest nests JSON deeper" in by_label["drop:bomb"]["reason"]
    assert "linked/: config.json is a symbolic link" in by_label["drop:linked"]["reason"]
    assert folder_digest(project / "drop") == before  # only read
    c = tracking.client()
    dropped = {v["tags"]["drop_files"]: v for v in versions("mesa-dropped")}
    assert len(dropped) == 2, dropped  # the refused folders stay out of the registry
    for v in dropped.values():
        assert v["tags"]["signature"].startswith("signed by key"), v["tags"]["signature"]
    files = {n: {a.path for a in c.list_artifacts(v["run_id"], "model")}
             for n, v in dropped.items()}
    assert {"model/model.onnx", "model/model.sig"} in files.values(), files
    assert {"model/model.safetensors", "model/config.json", "model/model.sig"} in \
        files.values(), files
    (kept,) = tracking.model_versions(("uploaded-hf",))
    assert kept["tags"]["scan_verdict"] == "clean" and kept["tags"]["signature"].startswith(
        "signed by key")
    # what we registered comes back whole: our folder, with our signature inside, verifies
    back = discover.fetch_version.fn({**kept, "tags": {}}, project / "refetch")
    assert back.folder and [Path(f).name for f in back.files] == \
        ["model.safetensors", "config.json", "model.sig"]
    assert check.check_model.fn(back, load_params(project / "params.yaml")).signature.startswith(
        "verified: signed by key")


# --------------------------------------------------------------------------- hostile inputs


class Payload:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile(root: Path, marker: Path) -> dict[str, str]:
    """Write every bad input into the drop folder; returns label -> expected reason."""
    d, clean = root / "drop", MODELS / "clean"
    manifest = (MODELS / "clean.json").read_text()
    weights = (MODELS / "clean.safetensors").read_bytes()

    def pair(name: str, blob: bytes, text: str | None = manifest) -> None:
        (d / f"{name}.safetensors").write_bytes(blob)
        if text is not None:
            (d / f"{name}.json").write_text(text)

    pair("evil", pickle.dumps(Payload(marker), protocol=2))
    (d / "evil2.pt").write_bytes(pickle.dumps(Payload(marker)))
    pair("truncated", weights[: len(weights) // 2])
    pair("empty", b"")
    pair("wide", weights, manifest.replace('"width": 1', '"width": 2'))
    pair("giant", weights, manifest.replace('"width": 1', '"width": 10000'))
    tensors = load_file(str(clean.with_suffix(".safetensors")))
    tensors["fc.weight"][0, 0] = float("nan")
    save_file(tensors, str(d / "nan.safetensors"))
    (d / "nan.json").write_text(manifest)
    pair("vgg", weights, manifest.replace('"resnet8"', '"vgg99"'))
    pair("nomanifest", weights, None)
    pair("badjson", weights, "{not json")
    pair("huge", weights + b"\0" * (2 << 20))
    ten = yaml.safe_load(manifest)
    ten.update(num_classes=10, classes=[f"c{k}" for k in range(10)])
    save_model(build_model("resnet8", 10, ten["mean"], ten["std"], width=1), d / "tenclass",
               Manifest(**{**ten, "classes": tuple(ten["classes"])}))
    return {"drop:evil": "refusing to load a pickle", "drop:evil2.pt": "unsupported file",
            "drop:truncated": "truncated", "drop:empty": "empty", "drop:wide": "do not match",
            "drop:giant": "max_parameters",
            "drop:nan": "NaN/Inf", "drop:vgg": "unknown architecture 'vgg99'",
            "drop:nomanifest": "manifest file is missing", "drop:badjson": "not valid JSON",
            "drop:huge": "more than 1.5 x", "drop:tenclass": "class count 10"}


def test_hostile_inputs_are_rejected_and_the_batch_goes_on(project: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    marker = project / "PAYLOAD_RAN"
    expected = _hostile(project, marker)
    drop(project, "good", "clean")
    # a hostile version in the registry too: NaN weights registered by someone
    nan_dir = project / "upload"
    nan_dir.mkdir()
    shutil.copyfile(project / "drop" / "nan.safetensors", nan_dir / "m.safetensors")
    (nan_dir / "m.json").write_text((project / "drop" / "nan.json").read_text().replace(
        '"data_hash": ""', '"data_hash": "uploaded"'))  # not the same files as drop:nan
    run = tracking.start_run("upload", {}, experiment="uploads")
    tracking.register_model(run, (nan_dir / "m.safetensors", nan_dir / "m.json"), "uploaded",
                            {"scan_verdict": "not scanned"}, "someone's model")
    before = folder_digest(project / "drop")
    result = scan_flows.discover_and_scan(params_path=str(project / "params.yaml"))
    by_label = {o["label"]: o for o in result["scanned"]}
    assert not marker.exists()  # the pickle's payload never ran
    for label, reason in expected.items():
        assert by_label[label]["status"] == "rejected", by_label[label]
        assert reason in by_label[label]["reason"], (label, by_label[label]["reason"])
        run = tracking.client().get_run(by_label[label]["run_id"])
        assert run.data.tags["scan_verdict"] == "rejected"
        assert reason in run.data.tags["scan_reason"]
    assert by_label["drop:good"]["status"] in ("clean", "backdoored")  # the batch went on
    reg = by_label["registry:uploaded/1"]
    assert reg["status"] == "rejected" and "NaN/Inf" in reg["reason"]
    kept = tracking.model_versions(("uploaded",))[0]
    assert kept["tags"]["scan_verdict"] == "rejected" and "NaN" in kept["tags"]["scan_reason"]
    c = tracking.client()
    assert {a.path for a in c.list_artifacts(kept["run_id"], "model")} == {"model/m.json",
                                                                           "model/m.safetensors"}
    assert folder_digest(project / "drop") == before
    assert [v["tags"]["scan_verdict"] for v in versions("mesa-dropped")] == \
        [by_label["drop:good"]["status"]]  # rejected files never enter the registry
    assert "REJECTED drop:evil" in caplog.text


# --------------------------------------------------------------------------- exactly once


def test_two_overlapping_discoveries_scan_each_model_once(project: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    for i in range(3):
        drop(project, f"m{i}", "clean" if i % 2 else "backdoored", variant=f"copy{i}")
    barrier = threading.Barrier(2)
    real = service.drop_candidates

    def both_see_everything(*args, **kwargs):
        found = real(*args, **kwargs)
        barrier.wait(timeout=60)  # neither run claims before both have discovered
        return found

    monkeypatch.setattr(service, "drop_candidates", both_see_everything)
    results: list = []

    def run() -> None:
        results.append(scan_flows.discover_and_scan(params_path=str(project / "params.yaml")))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 2
    scanned = [o["label"] for r in results for o in r["scanned"]]
    elsewhere = [label for r in results for label in r["claimed_elsewhere"]]
    assert sorted(scanned) == ["drop:m0", "drop:m1", "drop:m2"]  # each exactly once
    assert sorted(scanned + elsewhere) == sorted(["drop:m0", "drop:m1", "drop:m2"] * 2)
    assert len(scan_runs(project)) == 3 and len(versions("mesa-dropped")) == 3


# --------------------------------------------------------------------------- down servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_down_mlflow_server_is_a_clear_error_and_nothing_is_claimed(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drop(project, "m", "clean")
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=f"MLflow tracking server {uri} is not reachable"):
        scan_flows.main(["once", "--params", str(project / "params.yaml")])
    assert time.perf_counter() - start < 10
    assert not list((project / "state").rglob("*.claim"))


def test_down_prefect_server_is_a_clear_error(project: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        with pytest.raises(SystemExit, match=f"Prefect server {url} is not reachable"):
            scan_flows.main(["once", "--params", str(project / "params.yaml")])


def test_server_dying_mid_scan_leaves_the_model_unscanned(project: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    drop(project, "m", "clean")
    params_path = str(project / "params.yaml")

    def down(*args, **kwargs):
        raise TrackingError("MLflow tracking server http://x is not reachable (test)")

    monkeypatch.setattr(scan_flows, "record", scan_flows.record.with_options(retries=0))
    monkeypatch.setattr(tracking, "register_model", down)
    with pytest.raises(RuntimeError, match="stay unscanned for the next run: drop:m: Tracking"):
        scan_flows.discover_and_scan(params_path=params_path)
    state = service.store_folder(load_params(params_path))
    store = ClaimStore(state)
    assert store.held() == [] and not list((project / "state").rglob("done/*.json"))
    assert Ledger(state / "ledger.jsonl").entries() == []
    monkeypatch.undo()
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    result = scan_flows.discover_and_scan(params_path=params_path)
    assert [o["label"] for o in result["scanned"]] == ["drop:m"]


# --------------------------------------------------------------------------- scale-out


def test_dask_runner_fans_out_the_classes_of_a_model(project: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prefect_dask")
    path = write_params(project, {**FAST, "scan.task_runner": "dask", "scan.workers": 2,
                                  "scan.class_chunks": 3})
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))  # for the workers
    drop(project, "m", "backdoored")
    result = scan_flows.discover_and_scan(params_path=str(path))
    (outcome,) = result["scanned"]
    run = tracking.client().get_run(outcome["run_id"])
    assert {f"class.mask.{k}.mask_l1" for k in range(6)} <= set(run.data.metrics)
    assert outcome["status"] in ("clean", "backdoored")



def test_each_tracking_store_keeps_its_own_scan_records(project: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model scanned into a local store (`python -m flows.scan model`, ./mlflow.db) is not
    "scanned" for a server: its done record, naming a run of the local store, stays there."""
    params = load_params(project / "params.yaml")
    local = service.claim_store(params)
    local.finish("ab" * 32, {"status": "backdoored", "run_id": "local-run"})
    assert local.done("ab" * 32)["run_id"] == "local-run"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://svc:secret@127.0.0.1:5000")
    server = service.claim_store(params)
    assert server.done("ab" * 32) is None and server.root != local.root
    text = (Path(server.root) / "store.txt").read_text()
    assert text == "http://127.0.0.1:5000\n"  # which store, without its password
