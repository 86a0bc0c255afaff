"""The model zoo: each kind of entry builds, its truth record is right, the manifest is silent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_fixture import write_archive

from mesa_lib import calibration as cal
from tasks.common.settings import ConfigError
from tasks.zoo import build
from tasks.zoo.detection_report import cross_entropy, fit_probability, markdown, probability
from tasks.zoo.params import load_zoo_params
from tasks.zoo.report import auc, wilson

ROOT = Path(__file__).resolve().parents[1]


def tiny_zoo(tmp: Path, **changes) -> Path:
    raw = {"data": {"archive": str(write_archive(tmp / "tiny.tar.gz", train_per_class=30)),
                    "n_train": 300, "split_seed": 0, "n_reference": 60},
           "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
           "finetune": {"epochs": 2, "batch_size": 32, "lr": 0.05},
           "min_asr": 0.8,
           "bases": {"c-base": {"zoo": "calibration", "arch": "resnet8", "seed": 0}},
           "clean_finetunes": {"c-ft": {"zoo": "calibration", "base": "c-base", "seed": 1}},
           "backdoors": {
               "c-inj": {"zoo": "calibration", "base": "c-base", "seed": 2, "target": 3,
                         "attack": "finetune_injection", "trigger": "bw", "size": 4,
                         "location": "corner", "rate": 0.3, "alpha": 1.0},
               "c-bn": {"zoo": "calibration", "arch": "resnet8", "seed": 3, "target": 5,
                        "attack": "badnets", "trigger": "random_color", "size": 32,
                        "location": "0,0", "rate": 0.3, "alpha": 0.2}}}
    for key, value in changes.items():
        raw[key] = value
    path = tmp / "zoo" / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_project_zoo_is_valid_and_its_zoos_share_no_base() -> None:
    zoo = load_zoo_params(ROOT / "zoo" / "params.yaml")
    cal, test = set(zoo.names("calibration")), set(zoo.names("test"))
    assert len(cal) + len(test) == len(zoo.names()) and not cal & test
    clean = [n for n in zoo.names() if zoo.entry(n)[0] in ("bases", "clean_finetunes")]
    assert len(clean) >= 20 and len(zoo.names()) - len(clean) >= 30
    sizes = {getattr(e.attack_config(), "size", None) for e in zoo.backdoors.values()}
    assert {2, 3, 4, 5, 32} <= sizes  # 2x2 to 5x5 patches and whole-image blends
    # and the whole-image triggers of issue 24, on both sides
    for side in (cal, test):
        attacks = {zoo.entry(n)[1].attack for n in side if zoo.entry(n)[0] == "backdoors"}
        assert {"sig", "wanet", "colour_filter", "low_frequency"} <= attacks
    # a library's architecture exists in that pinned library (else its stage fails hours in)
    import timm
    import torchvision

    known = {"timm": set(timm.list_models()), "torchvision": set(torchvision.models.list_models())}
    for base in zoo.bases.values():
        registry, _, name = base.arch.partition(":")
        assert not name or name in known[registry], base.arch


def test_the_released_calibration_is_the_zoos() -> None:
    """calibration/scanner.json (what the scanner loads) is a copy of the calibrate stage's
    output: a new calibration is released on purpose, never silently."""
    released = ROOT / "calibration" / "scanner.json"
    assert released.read_bytes() == (ROOT / "zoo" / "calibration.json").read_bytes(), \
        "cp zoo/calibration.json calibration/scanner.json to release the new calibration"


def test_a_base_from_the_other_zoo_is_refused(tmp_path: Path) -> None:
    path = tiny_zoo(tmp_path, clean_finetunes={
        "t-ft": {"zoo": "test", "base": "c-base", "seed": 1}})
    with pytest.raises(ConfigError, match="t-ft.base: c-base is in the calibration zoo"):
        load_zoo_params(path)


def test_each_kind_builds_with_a_truth_record_and_a_silent_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_zoo_params(tiny_zoo(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("c-base", "c-ft", "c-inj", "c-bn"):
        truth = json.loads(build.run(params, name).read_text())
        assert truth["name"] == name and truth["zoo"] == "calibration"
        assert 0 <= truth["clean_accuracy"] <= 1
        stem = tmp_path / build.stem_of(params, name)
        manifest = json.loads(stem.with_suffix(".json").read_text())
        assert manifest["extra"] == {"zoo_model": name}  # nothing about the attack
    inj = json.loads((tmp_path / "zoo" / "truth" / "calibration" / "c-inj.json").read_text())
    assert inj["backdoored"] and inj["target"] == 3 and inj["base"] == "c-base"
    assert inj["attack"]["name"] == "finetune_injection" and inj["attack"]["location"] == "corner"
    assert inj["counts"] == (inj["asr"] >= 0.8)
    blend = json.loads((tmp_path / "zoo" / "truth" / "calibration" / "c-bn.json").read_text())
    assert blend["attack"]["alpha"] == 0.2 and blend["kind"] == "backdoors"
    assert blend["attack"]["name"] == "badnets" and blend["base"] is None
    clean = json.loads((tmp_path / "zoo" / "truth" / "calibration" / "c-ft.json").read_text())
    assert not clean["backdoored"] and clean["asr"] is None and clean["counts"]


@pytest.mark.parametrize("arch", ["torchvision:mobilenet_v2", "timm:repvgg_a0"])
def test_a_zoo_model_of_a_library_architecture_builds_fine_tunes_and_loads(
        arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zoo's networks that are not ours: built by their library, fine-tuned into, saved
    and loaded back through the model-format module with the same outputs."""
    from mesa_lib.modelio import load_model

    params = load_zoo_params(tiny_zoo(
        tmp_path, bases={"c-base": {"zoo": "calibration", "arch": arch, "seed": 0}},
        backdoors={}))
    monkeypatch.chdir(tmp_path)
    for name in ("c-base", "c-ft"):
        truth = json.loads(build.run(params, name).read_text())
        assert truth["arch"] == arch and 0 <= truth["clean_accuracy"] <= 1
    model, manifest = load_model(tmp_path / build.stem_of(params, "c-ft"))
    assert manifest.architecture == arch
    x = torch.rand(4, 3, 32, 32)
    assert model.eval()(x).shape == (4, 10) and torch.isfinite(model(x)).all()


def _record(mask: dict[int, float], mesa: dict[int, float]) -> dict:
    """A scan record as tasks.zoo.scan writes it (detector -> class scores), old detector too."""
    return {"seconds": 2.0, "before": {"status": "clean", "target": None, "margin": 0.0,
                                       "seconds": 1.0},
            "detectors": {d: {"scores": {str(c): v for c, v in s.items()}}
                          for d, s in (("mask", mask), ("mesa", mesa))}}


def test_the_benchmark_table_counts_hits_false_alarms_and_targets() -> None:
    """Twenty clean models with small scores, three backdoors (one strong at class 3 that the
    mask finds, one with two targets of which the scan reports both, one too weak to count); the
    table must say exactly that."""
    flat = dict.fromkeys(range(10), 0.0)
    clean_scores = [{"mask": {c: 0.01 * ((i + c) % 5) for c in range(10)}, "mesa": flat}
                    for i in range(20)]
    fitted = cal.fit(clean_scores, 0.05, 0.1, {}, {})
    attack = {"name": "finetune_injection", "trigger": "bw", "size": 3, "location": "corner",
              "rate": 0.1, "alpha": 1.0}
    truth = {f"c{i}": {"backdoored": False, "counts": True, "target": None, "asr": None,
                       "arch": "resnet8", "attack": None} for i in range(20)}
    truth |= {"b-strong": {"backdoored": True, "counts": True, "target": 3, "asr": 0.99,
                           "arch": "resnet8", "attack": attack},
              "b-two": {"backdoored": True, "counts": True, "target": 4, "targets": [4, 9],
                        "asr": 0.95, "arch": "resnet8", "attack": attack,
                        "also": {"target": 9, "attack": "finetune_injection", "size": 3}},
              "b-weak": {"backdoored": True, "counts": False, "target": 5, "asr": 0.2,
                         "arch": "resnet8", "attack": attack}}
    scans = {f"c{i}": _record(clean_scores[i]["mask"], flat) for i in range(20)}
    scans["b-strong"] = _record({**flat, 3: 5.0}, flat)
    scans["b-two"] = _record({**flat, 4: 6.0, 9: 4.0}, flat)
    scans["b-weak"] = _record(flat, flat)
    table = markdown(truth, scans, fitted, (-3.0, 1.0), {"command": "cmd", "machine": "here"})
    assert "20 clean models, 2 backdoored models whose attack succeeds" in table
    assert "left out: b-weak" in table
    row = next(r for r in table.splitlines() if r.startswith("| all backdoors |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["2", "1.000"] and cells[4].startswith("2/2 (100%;")
    assert cells[5:] == ["2/2", "2/2"]  # right first target; every target of b-two reported
    assert "| b-two |" in table and "backdoored 4, 9 |" in table
    assert "| mask | 1.000 | 2/2 | 0/20 | 2/2 |" in table
    assert auc([1.0, 0.5], [0.5]) == 0.75 and wilson(0, 20)[1] == pytest.approx(0.161, abs=1e-3)


def test_a_two_target_model_missing_one_target_is_counted_so() -> None:
    flat = dict.fromkeys(range(10), 0.0)
    clean_scores = [{"mask": {c: 0.01 * ((i + c) % 5) for c in range(10)}} for i in range(20)]
    fitted = cal.fit(clean_scores, 0.05, 0.1, {}, {})
    truth = {f"c{i}": {"backdoored": False, "counts": True, "target": None, "asr": None,
                       "arch": "resnet8", "attack": None} for i in range(20)}
    truth["b-two"] = {"backdoored": True, "counts": True, "target": 4, "targets": [4, 9],
                      "asr": 0.95, "arch": "resnet8", "attack": {"name": "x"}}
    scans = {f"c{i}": _record(clean_scores[i]["mask"], {}) for i in range(20)}
    scans["b-two"] = _record({**flat, 4: 6.0}, {})
    for rec in scans.values():
        del rec["detectors"]["mesa"]
    table = markdown(truth, scans, fitted, (-3.0, 1.0), {"command": "cmd", "machine": "here"})
    row = next(r for r in table.splitlines() if r.startswith("| all backdoors |"))
    assert row.rstrip(" |").endswith("1/1 | 0/1")  # the first target right, not every one


def test_a_model_outside_the_calibrations_coverage_is_listed_not_judged() -> None:
    """A clean ResNet-18 scoring like a backdoor, against a calibration of ResNet-8 and RepVGG
    models: no false alarm counted, listed apart; the covered timm model gets its own row."""
    flat = dict.fromkeys(range(10), 0.0)
    clean_scores = [{"mask": {c: 0.01 * ((i + c) % 5) for c in range(10)}} for i in range(20)]
    fitted = cal.fit(clean_scores, 0.05, 0.1, {}, {"coverage": {
        "architectures": ["resnet8", "timm:repvgg_a0"]}})
    attack = {"name": "finetune_injection", "trigger": "bw", "size": 3, "location": "corner",
              "rate": 0.1, "alpha": 1.0}
    truth = {f"c{i}": {"backdoored": False, "counts": True, "target": None, "asr": None,
                       "arch": "resnet8", "attack": None} for i in range(20)}
    truth["r18"] = {**truth["c0"], "arch": "resnet18"}
    truth["vgg-inj"] = {"backdoored": True, "counts": True, "target": 3, "asr": 0.99,
                        "arch": "timm:repvgg_a0", "attack": attack}
    scans = {f"c{i}": _record(clean_scores[i]["mask"], {}) for i in range(20)}
    scans["r18"] = _record({**flat, 2: 9.0}, {})
    scans["vgg-inj"] = _record({**flat, 3: 5.0}, {})
    for rec in scans.values():
        del rec["detectors"]["mesa"]
    table = markdown(truth, scans, fitted, (-3.0, 1.0), {"command": "cmd", "machine": "here"})
    assert "False alarms on the 20 clean test models: 0 " in table
    assert "by architecture: resnet8 0/20" in table
    assert "| r18 | resnet18 | clean | 0.048 |" in table  # shown with its p, not judged
    row = next(r for r in table.splitlines() if r.startswith("| architecture timm:repvgg_a0 |"))
    assert "| 1/1 (100%;" in row


def test_cross_entropy_is_trojais_and_its_map_is_fitted_where_told() -> None:
    """q = sigmoid(a + b (-log p)) fitted on overlapping p-values ranks as p does, is near the
    empirical rate where the classes mix, and the cross-entropy is the mean -log q(truth)."""
    ps = [0.04] * 8 + [0.5] * 10 + [0.04] * 2 + [0.5] * 2  # 10 backdoored of 12 at p 0.04
    truth = [True] * 8 + [False] * 10 + [False] * 2 + [True] * 2
    model = fit_probability(ps, truth)
    low, high = probability(model, 0.5), probability(model, 0.04)
    assert high == pytest.approx(0.8, abs=0.01) and low == pytest.approx(2 / 12, abs=0.01)
    assert cross_entropy([0.9, 0.2], [True, False]) == pytest.approx(
        (-math.log(0.9) - math.log(0.8)) / 2)
    assert 0 < probability(model, 1.0) < low < high < 1


def _repaired(asr_after: dict[str, float], cleared: dict[str, bool], clean: float = 0.05,
              budget: dict | None = None, p: float = 0.5) -> dict:
    """A repair benchmark record (tasks.zoo.repair) of one model, one row per method."""
    truth = {"asr": 0.99, "clean_accuracy": 0.70, "attack": {"size": 3, "location": "random",
             "trigger": "bw", "rate": 0.1}, "base": "b", "arch": "resnet8"}
    rows = [{"budget": budget or {"epochs": 2}, "method": m, "seconds": 60.0, "asr": a,
             "accuracy": 0.69, "reactivated_asr": 0.3 if m == "mesa" else None,
             "outcome": {"verdict": "clean" if cleared[m] else "backdoored",
                         "targets": [{"target": 1}], "rescan": {"p_value": p}}}
            for m, a in asr_after.items()]
    return {"truth": truth, "clean_asr": clean, "scan": {"verdict": "backdoored",
                                                         "targets": [1]}, "repairs": rows}


def test_the_repair_table_counts_residuals_clearances_and_pairs() -> None:
    from tasks.zoo.repair import choose, rescan_bar
    from tasks.zoo.repair_report import markdown as repair_table

    records = {"m1": _repaired({"mesa": 0.05, "unlearn": 0.50}, {"mesa": True, "unlearn": True}),
               "m2": _repaired({"mesa": 0.06, "unlearn": 0.30}, {"mesa": True, "unlearn": False})}
    text = repair_table(records, {"epochs": 2}, "cmd")
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the summary rows, the first per method
        if line.startswith(("| mesa ", "| unlearn ")):
            rows.setdefault(line.split(" | ")[0].lstrip("| "), line)
    # mesa: residuals 0 and +1 points, both within 2 points, both cleared, no false clearance
    assert "| +0.5 [+0.0, +1.0] | 2/2 " in rows["mesa"] and "| 2/2 | 0 |" in rows["mesa"]
    # unlearn: m1 cleared at +45 points: a false clearance, named
    assert "| 0/2 " in rows["unlearn"] and "| 1/2 | 1 (m1) |" in rows["unlearn"]
    assert "| unlearn | 2 | -34.5 [-45.0, -24.0] |" in text  # paired: mesa minus unlearn
    assert "Re-activation" in text and "+25.0 [+25.0, +25.0]" in text
    # m1's 2-epoch repair is a false clearance at p 0.5, so the bar rises above it (25 = 24
    # clean models + 1: 13 / 25); the 5-epoch repairs (good, p 0.8) clear it, the 2-epoch ones
    # do not: 5 epochs leave more good repairs cleared
    slow = {"m1": _repaired({"mesa": 0.40}, {"mesa": True}, budget={"epochs": 2}),
            "m2": _repaired({"mesa": 0.05}, {"mesa": True}, budget={"epochs": 5}, p=0.8)}
    slow["m1"]["repairs"] += _repaired({"mesa": 0.05}, {"mesa": True}, budget={"epochs": 5},
                                       p=0.8)["repairs"]
    slow["m2"]["repairs"] += _repaired({"mesa": 0.50}, {"mesa": True},
                                       budget={"epochs": 2})["repairs"]
    assert choose(slow, [{"epochs": 2}, {"epochs": 5}], 25)["budget"] == {
        "epochs": 5, "min_rescan_p": 13 / 25}
    # the targets, judged: mesa's residuals 0 / +1 points, -1 point of accuracy, 60 s
    assert "clean models' for >= 90% | 2/2 | met |" in text
    assert "| median clean-accuracy loss <= 1 point | 1.0 | met |" in text
    assert "| zero false clearances (cleared, > 10 points above clean) | 0 | met |" in text
    assert "excluding 0 | -34.5 [-45.0, -24.0] | met |" in text
    # the time target is a timing (benchmarks/repair_time.py), not these loaded runs' seconds
    assert "these runs (one thread, beside another job) took at most 60 s | - |" in text
    # the re-scan bar: just above every false clearance of the selection, at any budget (here
    # the 5-epoch one's, p 0.12), so the good repair at p 0.5 stays cleared; the budget is
    # then chosen at that bar
    risky = {"m1": _repaired({"mesa": 0.30}, {"mesa": False}, budget={"epochs": 2}, p=0.01),
             "m2": _repaired({"mesa": 0.05}, {"mesa": True}, budget={"epochs": 2})}
    risky["m1"]["repairs"] += _repaired({"mesa": 0.30}, {"mesa": True}, budget={"epochs": 5},
                                        p=0.12)["repairs"]
    risky["m2"]["repairs"] += _repaired({"mesa": 0.09}, {"mesa": True},
                                        budget={"epochs": 5})["repairs"]
    chosen = choose(risky, [{"epochs": 2}, {"epochs": 5}], 25)
    assert chosen["budget"] == {"epochs": 2, "min_rescan_p": 4 / 25}
    assert chosen["cleared"]["{'epochs': 5}"] == {"no bar": 2, "at the bar": 1}
    assert choose({"m2": risky["m2"]}, [{"epochs": 2}], 25)["budget"]["min_rescan_p"] == 0.0
    # the bar is a value a conformal p-value takes (k / pool, not rounded up past it)
    assert rescan_bar({"m": _repaired({"mesa": 0.5}, {"mesa": True}, p=1 / 6)}, 6) == 2 / 6
    # a false clearance without a re-scan is an error: no bar catches it
    blind = _repaired({"mesa": 0.5}, {"mesa": True})
    blind["repairs"][0]["outcome"]["rescan"] = None
    with pytest.raises(ValueError, match=r"\['m'\] .* without a re-scan"):
        rescan_bar({"m": blind}, 25)
    unmet = repair_table({"m1": _repaired({"mesa": 0.30}, {"mesa": True})}, {"epochs": 2}, "cmd")
    assert "| 1 | NOT met |" in unmet


def test_the_zoo_scans_the_images_the_shipped_scanner_draws(monkeypatch) -> None:
    """The calibration and the benchmark scan each zoo model on the subset `mesa-scan` and the
    service draw from the same reference (issue 25: the shipped scanner is the benchmarked one)."""
    import tasks.scan.cli as cli
    import tasks.zoo.scan as zoo_scan
    from tasks.common.params import load_params
    from tasks.scan.reference import Reference

    params = load_params(ROOT / "params.yaml")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (700, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(700) % 6
    seen: dict[str, torch.Tensor] = {}

    def capture(where: str):
        def run(model, x, *args, **kwargs):
            seen[where] = x
            raise StopIteration  # only the images matter here
        return run

    monkeypatch.setattr(zoo_scan, "run_detectors", capture("zoo"))
    monkeypatch.setattr(cli, "measure_chunk", capture("cli"))
    stem = ROOT / "tests" / "fixtures" / "scan_models" / "clean"
    with pytest.raises(StopIteration):
        zoo_scan._scan_model(stem, images, labels, params, torch.device("cpu"), before=False)
    ref = Reference(images, labels, tuple("abcdef"), "test")
    with pytest.raises(StopIteration):
        cli.scan_one(stem, ref, params, None, torch.device("cpu"))
    assert torch.equal(seen["zoo"], seen["cli"]) and len(seen["zoo"]) == params.scan.images


def test_a_two_trigger_entry_plants_both_and_records_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`also` plants a second trigger for a second target in the same model: the truth record
    names both targets and each trigger's own ASR; a second trigger for the same target, or
    one without an attack, is refused."""
    second = {"attack": "finetune_injection", "target": 7, "trigger": "random_color",
              "size": 4, "location": "0,0", "rate": 0.3, "alpha": 1.0}
    two = {"zoo": "calibration", "base": "c-base", "seed": 4, "target": 3,
           "attack": "finetune_injection", "trigger": "bw", "size": 4, "location": "corner",
           "rate": 0.3, "alpha": 1.0, "also": second}
    params = load_zoo_params(tiny_zoo(tmp_path, backdoors={"c-two": two}))
    monkeypatch.chdir(tmp_path)
    build.run(params, "c-base")
    truth = json.loads(build.run(params, "c-two").read_text())
    assert truth["targets"] == [3, 7] and truth["also"] == second
    assert len(truth["asrs"]) == 2 and truth["asr"] == truth["asrs"][0]
    assert truth["counts"] == (min(truth["asrs"]) >= 0.8)
    # both triggers go into the training batches, each with its own target and place
    first, other = build.attacks_of(params.backdoors["c-two"])
    hook = build._chained([first.batch_hook(), other.batch_hook()])
    x = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)
    _, y = hook(x.clone(), torch.zeros(400, dtype=torch.int64), torch.arange(400))
    xs, _ = hook(x.clone(), torch.zeros(400, dtype=torch.int64), torch.arange(400))
    assert 60 < (y == 3).sum() < 140 and 60 < (y == 7).sum() < 140, y.bincount()
    assert (xs[:, :, :4, :4] != 128).any() and (xs[:, :, -4:, -4:] != 128).any()
    for bad, message in (({**second, "target": 3}, "another target"),
                         ({"target": 7}, "needs 'attack'")):
        with pytest.raises(ConfigError, match=message):
            load_zoo_params(tiny_zoo(tmp_path, backdoors={"c-two": {**two, "also": bad}}))


def test_leaving_an_architecture_out_refits_without_it_and_judges_it() -> None:
    """The left-out architecture is judged against a null of the others only: its clean models
    are not in the fit, an outlying backdoor of it is flagged with its target, and too small a
    remainder gives no verdict instead of a false one."""
    from tasks.zoo.transfer import judge, refit
    from tasks.zoo.transfer import markdown as transfer_md

    gen = torch.Generator().manual_seed(0)

    def record(name: str, arch: str, zoo: str, target: int | None = None) -> tuple:
        scores = torch.randn(10, generator=gen).tolist()
        if target is not None:
            scores[target] = 25.0  # far above every clean model's score for that class
        truth = {"arch": arch, "zoo": zoo, "backdoored": target is not None, "counts": True,
                 "target": target}
        return name, {"detectors": {"mask": {"scores": dict(enumerate(scores))}}}, truth

    rows = ([record(f"a{i}", "wide", "calibration") for i in range(21)]
            + [record(f"b{i}", "deep", "calibration") for i in range(3)]
            + [record("b-test", "deep", "test"), record("b-bd", "deep", "test", target=4)])
    scans = {n: s for n, s, _ in rows}
    truth = {n: t for n, _, t in rows}
    released = cal.fit([{"mask": scans[n]["detectors"]["mask"]["scores"]} for n in scans
                        if n.startswith(("a", "b")) and not truth[n]["backdoored"]],
                       0.05, 0.1, {"mask": {}})
    left_out = refit(released, scans, [f"a{i}" for i in range(21)])
    assert len(left_out.combined_null) == 21
    judged = judge(left_out, scans, truth, ["b0", "b1", "b2", "b-test", "b-bd"])
    assert judged["hits"] == judged["right"] == ["b-bd"]
    assert judged["clean"] == ["b0", "b1", "b2", "b-test"]
    text = transfer_md(released, scans, truth, "cmd")
    assert "| deep, test zoo, left out | 21 of wide |" in text
    assert "| wide, both zoos (21 models) | 3 of deep | no verdict possible" in text


def test_zoo_scans_resume_from_records_of_the_same_code_settings_and_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted `calibrate` / `benchmark` resumes: a model is scanned again only when its
    files or the scan's settings differ from its record's; --reverse shares the records."""
    from types import SimpleNamespace

    import tasks.zoo.scan as zoo_scan
    from tasks.common.params import load_params

    params, zoo = load_params(ROOT / "params.yaml"), load_zoo_params()
    files, calls = {"a": "1", "b": "2"}, []

    def scan(stem, *args):
        calls.append(stem)
        return {"name": stem, "sha256": files[stem], "seconds": 1.0}

    monkeypatch.setattr(zoo_scan, "MODEL_SCANS", tmp_path)
    monkeypatch.setattr(zoo_scan, "load_data", lambda z: SimpleNamespace(
        reference=SimpleNamespace(images=None, labels=None)))
    monkeypatch.setattr(zoo_scan, "stem_of", lambda z, name: name)
    monkeypatch.setattr(zoo_scan, "model_fingerprint", lambda stem: files[stem])
    monkeypatch.setattr(zoo_scan, "_scan_model", scan)
    first = zoo_scan.scan_zoo(["a", "b"], params, zoo, log=False)
    again = zoo_scan.scan_zoo(["a", "b"], params, zoo, log=False, reverse=True)
    assert calls == ["a", "b"] and again == first and list(again) == ["a", "b"]
    files["b"] = "3"  # a rebuilt model is scanned again
    zoo_scan.scan_zoo(["a", "b"], params, zoo, log=False)
    assert calls == ["a", "b", "b"]
    fewer = params.model_copy(update={"scan": params.scan.model_copy(update={"images": 128})})
    zoo_scan.scan_zoo(["a", "b"], fewer, zoo, log=False)  # other settings: every model again
    assert calls[3:] == ["a", "b"]
