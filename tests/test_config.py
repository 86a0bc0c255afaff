"""params.yaml -> typed frozen pydantic models; every bad key is named before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tasks.common import params as cfg
from tasks.common.params import ConfigError, apply_overrides, load_params, params_from_dict
from tasks.common.settings import read_params_file

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as info:
        params_from_dict(apply_overrides(RAW, overrides))
    return str(info.value)


def test_project_params_load_typed_and_frozen() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params.recover.betas, tuple) and isinstance(params.recover.lr, float)
    assert params.to_dict() == RAW | {"recover": {**RAW["recover"],
                                                  "betas": list(params.recover.betas)}}
    with pytest.raises(ValidationError, match="frozen"):
        params.train.epochs = 3  # type: ignore[misc]
    assert hash(params) == hash(load_params(ROOT / "params.yaml"))  # usable as a cache key


def test_paper_profile_loads() -> None:
    paper = load_params(ROOT / "params-paper.yaml")
    assert paper.train.model == "resnet18" and paper.poison.attack == "finetune_injection"
    assert paper.recover.epochs == 10 and paper.data.n_defender == 8000


@pytest.mark.parametrize(("overrides", "message"), [
    ({"recover.alpha": "x"}, "recover.alpha: Input should be a valid number, got 'x'"),
    ({"recover.alpha": -0.1},
     "recover.alpha: Input should be greater than or equal to 0, got -0.1"),
    ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1, got 0"),
    ({"train.epochs": 2.5}, "train.epochs: Input should be a valid integer, got 2.5"),
    ({"train.epochs": True}, "train.epochs: Input should be a valid integer, got True"),
    ({"repair.rate": 1.5}, "repair.rate: Input should be less than or equal to 1, got 1.5"),
    ({"train.momentum": 1.0}, "train.momentum: Input should be less than 1, got 1.0"),
    ({"train.model": "vgg"}, "train.model: Input should be 'preact_resnet18', 'resnet18'"),
    ({"poison.settings.badnets.trigger": "pattern:51"},
     "poison.settings.badnets.trigger: pattern:K needs K in 0..50"),
    ({"poison.settings.badnets.alpha": 0.2},
     "poison.settings.badnets: the demo pipeline plants full-strength patches"),
    ({"poison.settings.badnets.trigger": "wanet"},
     "poison.settings.badnets.trigger: unknown trigger 'wanet'"),
    ({"poison.attack": "finetune_injection", "poison.settings": {"badnets": {}}},
     "poison.attack: expected one of poison.settings ['badnets'], got 'finetune_injection'"),
    ({"poison.settings": {"no_such_attack": {}}}, "poison.settings.no_such_attack: unknown attack"),
    ({"base.device": "gpu"}, "base.device: String should match pattern"),
    ({"data.archive": 3}, "data.archive: Input should be a valid string, got 3"),
    ({"recover.betas": []}, "recover.betas: Value should have at least 1 item"),
    ({"recover.betas": [0.9, 1.5]}, "recover.betas.1: Input should be less than or equal to 1"),
    ({"poison.target": 10}, "poison.target: expected int < 10 (cifar10), got 10"),
    ({"poison.settings.badnets.size": 4},
     "poison.settings.badnets.size: demo is a 3x3 pattern, got 4"),
    ({"scan.detectors": {"mesa": {"eval_images": 1500}}},
     "scan.detectors.mesa.eval_images: expected <= scan.images / 2"),
    ({"scan.detectors": {"mask": {}, "abs": {}}}, "scan.detectors.abs: unknown detector"),
    ({"scan.detectors.mask.steps": 0},
     "scan.detectors.mask.steps: Input should be greater than or equal to 1, got 0"),
    ({"scan.detectors.mask.step": 5}, "scan.detectors.mask.step: unknown key"),
    ({"scan.detectors.mask.lr": "0.1"}, "scan.detectors.mask.lr: Input should be a valid number"),
    ({"scan.detectors": {}}, "scan.detectors: Dictionary should have at least 1 item"),
])
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    assert message in _error(overrides)


def test_unknown_and_missing_keys_and_groups() -> None:
    raw = apply_overrides(RAW, {"train.epoch": 3})
    del raw["repair"]["lr"]
    raw["extra"] = {}
    del raw["scan"]
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    text = str(info.value)
    assert "train.epoch: unknown key" in text and "repair.lr: missing key" in text
    assert "extra: unknown group" in text and "scan: missing group" in text


def test_every_problem_is_reported_at_once() -> None:
    text = _error({"recover.alpha": "x", "train.lr": 0})
    assert "recover.alpha" in text and "train.lr: Input should be greater than 0, got 0" in text


def test_model_names_mirror_the_library_and_every_trigger_kind_is_accepted() -> None:
    from mesa_lib.models import MODELS
    from mesa_lib.poison import PatchConfig
    from mesa_lib.triggers import TRIGGERS

    assert sorted(cfg.MODEL_NAMES) == sorted(MODELS)
    for kind in TRIGGERS:  # the attack's config checks a trigger with the library itself
        PatchConfig(trigger="pattern:50" if kind == "pattern" else kind, size=3)


def test_the_json_schema_in_docs_is_current() -> None:
    """docs/params.schema.json is `python -m tasks.common.params schema` of this code."""
    assert (ROOT / "docs" / "params.schema.json").read_text() == cfg.json_schema()
    schema = json.loads(cfg.json_schema())
    assert schema["additionalProperties"] is False and "validate" in schema["properties"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_stage_command_stops_before_any_work(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m flows.<stage>` with a bad key exits naming it; the flow never starts."""
    from tasks.pipeline.stage import main

    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(apply_overrides(RAW, {"recover.alpha": "x"})))
    called = []

    def flow(params_path: str) -> None:
        """Fake stage."""
        called.append(params_path)

    monkeypatch.setattr(sys, "argv", ["flows.recover", "--params", str(bad)])
    with pytest.raises(SystemExit) as info:
        main(flow)
    assert "recover.alpha: Input should be a valid number, got 'x'" in str(info.value.code)
    assert called == []


def test_set_args_turn_a_profile_into_dvc_overrides(tmp_path: Path) -> None:
    args = cfg.set_args(ROOT / "params-paper.yaml", ROOT / "params.yaml")
    assert "-S" in args and "train.model=resnet18" in args
    assert all(a == "-S" or "=" in a for a in args)
    assert cfg.set_args(ROOT / "params.yaml", ROOT / "params.yaml") == []
    assert cfg.set_args(ROOT / "params-paper.yaml") == args  # its own overlay_of
    # a key the base lacks (a plug-in block) is added with Hydra's `+`
    overlay = tmp_path / "mesa.yaml"
    overlay.write_text(f"overlay_of: {ROOT / 'params.yaml'}\n"
                       "scan: {detectors: {mesa: {beta: 0.9}}}\n")
    (flag, arg), = [cfg.set_args(overlay)]
    assert flag == "-S" and arg.endswith("+scan.detectors.mesa.beta=0.9")
    gpu = cfg.set_args(ROOT / "reproduce" / "params-gpu.yaml")
    assert f"{ROOT / 'reproduce' / 'params.yaml'}:model.arch=resnet18" in gpu


def test_an_overlay_names_its_base_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("overlay_of: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("overlay_of: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        read_params_file(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("overlay_of: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: its base: .*missing.yaml: params file not"):
        read_params_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("overlay_of:\n")
    with pytest.raises(ConfigError, match="overlay_of must name the base params file, got None"):
        read_params_file(tmp_path / "d.yaml")
    (tmp_path / "base.yaml").write_text("g: {k: 1, blocks: {m: {a: 1, b: 2}}}\n")
    (tmp_path / "e.yaml").write_text("overlay_of: base.yaml\ng: {blocks: {m: {b: 3}}}\n")
    assert read_params_file(tmp_path / "e.yaml") == {"g": {"k": 1, "blocks": {"m": {"a": 1,
                                                                                  "b": 3}}}}


def test_equal_params_hash_alike_and_plug_in_settings_are_logged_one_by_one() -> None:
    a = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["poison"]["settings"] = dict(reversed(list(raw["poison"]["settings"].items())))
    b = cfg.params_from_dict(raw)
    assert a == b and hash(a) == hash(b)
    logged = a.section("scan", "poison")
    assert logged["scan.detectors.mask.steps"] == 200
    assert logged["poison.settings.badnets.trigger"] == "demo"
