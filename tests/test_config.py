"""params.yaml -> typed frozen dataclasses; every bad key is named before any work."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from tasks import config as cfg
from tasks.config import ConfigError, apply_overrides, load_params, params_from_dict

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
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3  # type: ignore[misc]


def test_paper_profile_loads() -> None:
    paper = load_params(ROOT / "params-paper.yaml")
    assert paper.train.model == "resnet18" and paper.poison.attack == "finetune_injection"
    assert paper.recover.epochs == 10 and paper.data.n_defender == 8000


@pytest.mark.parametrize(("overrides", "message"), [
    ({"recover.alpha": "x"}, "recover.alpha: expected float >= 0, got 'x'"),
    ({"recover.alpha": -0.1}, "recover.alpha: expected float >= 0, got -0.1"),
    ({"train.epochs": 0}, "train.epochs: expected int >= 1, got 0"),
    ({"train.epochs": 2.5}, "train.epochs: expected int >= 1, got 2.5"),
    ({"train.epochs": True}, "train.epochs: expected int >= 1, got True"),
    ({"repair.rate": 1.5}, "repair.rate: expected float in [0, 1], got 1.5"),
    ({"train.momentum": 1.0}, "train.momentum: expected float in [0, 1), got 1.0"),
    ({"train.model": "vgg"}, "train.model: expected one of"),
    ({"poison.trigger": "pattern:51"}, "poison.trigger: expected str matching"),
    ({"base.device": "gpu"}, "base.device: expected str matching"),
    ({"recover.betas": []}, "recover.betas: expected non-empty list of float"),
    ({"recover.betas": [0.9, 1.5]}, "recover.betas: expected non-empty list of float in (0, 1]"),
    ({"poison.target": 10}, "poison.target: expected int < 10 (cifar10), got 10"),
    ({"scan.eval_images": 1500}, "scan.eval_images: expected <= scan.n_images / 2"),
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
    assert "train.epoch: unknown key" in text and "repair.lr: missing" in text
    assert "extra: unknown group" in text and "scan: missing group" in text


def test_every_problem_is_reported_at_once() -> None:
    text = _error({"recover.alpha": "x", "train.lr": 0})
    assert "recover.alpha" in text and "train.lr: expected float > 0, got 0" in text


def test_model_names_mirror_the_library() -> None:
    from mesa_lib.models import MODELS

    assert sorted(cfg.MODEL_NAMES) == sorted(MODELS)


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
    from tasks.stage import main

    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(apply_overrides(RAW, {"recover.alpha": "x"})))
    called = []

    def flow(params_path: str) -> None:
        """Fake stage."""
        called.append(params_path)

    monkeypatch.setattr(sys, "argv", ["flows.recover", "--params", str(bad)])
    with pytest.raises(SystemExit) as info:
        main(flow)
    assert "recover.alpha: expected float >= 0, got 'x'" in str(info.value.code)
    assert called == []


def test_set_args_turn_a_profile_into_dvc_overrides(tmp_path: Path) -> None:
    args = cfg.set_args(ROOT / "params-paper.yaml", ROOT / "params.yaml")
    assert "-S" in args and "train.model=resnet18" in args
    assert all(a == "-S" or "=" in a for a in args)
    assert cfg.set_args(ROOT / "params.yaml", ROOT / "params.yaml") == []
