"""Params groups -> the frozen config dataclasses of mesa_lib, in one place.

Every product builds its mesa_lib settings here, so the pipeline's `evaluate` stage and the scan
service scan with exactly the same `DetectConfig`, and the pipeline's repair and the scan's
repair fine-tune alike.
"""

from __future__ import annotations

from typing import Any

from mesa_lib.baselines import PointConfig
from mesa_lib.defence import DefenceConfig
from mesa_lib.detectors import ScanSettings, detector
from mesa_lib.mesa import MesaConfig
from mesa_lib.poison import Attack, attack_class, attack_from
from mesa_lib.repair import RepairConfig
from mesa_lib.train import TrainConfig
from tasks.common import plugins
from tasks.common.params import Params


def arch_kwargs(params: Params) -> dict[str, int]:
    """Architecture options of `build_model` implied by the params."""
    return {"width": params.train.width} if params.train.model == "resnet8" else {}


def train_config(params: Params, **changes: Any) -> TrainConfig:
    """TrainConfig from the `train` group (fields overridable, e.g. for the injection)."""
    t = params.train
    base = {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "momentum": t.momentum,
            "nesterov": t.momentum > 0, "weight_decay": t.weight_decay, "schedule": t.schedule,
            "warmup": t.warmup, "label_smoothing": t.label_smoothing, "seed": params.base.seed}
    return TrainConfig(**(base | changes))


def mesa_config(params: Params) -> MesaConfig:
    """MesaConfig from the `recover` group."""
    r = params.recover
    return MesaConfig(betas=r.betas, alpha=r.alpha, epochs=r.epochs, batch_size=r.batch_size,
                      lr=r.lr, hidden=r.hidden, mine_hidden=r.mine_hidden,
                      trigger_noise=r.trigger_noise, seed=params.base.seed)


def point_config(params: Params) -> PointConfig:
    """PointConfig from the `baseline` group."""
    b = params.baseline
    return PointConfig(starts=b.starts, epochs=b.epochs, batch_size=b.batch_size, lr=b.lr,
                       momentum=b.momentum, seed=params.base.seed)


def repair_config(params: Params, epochs: int | None = None) -> RepairConfig:
    """RepairConfig from the `repair` group (epochs overridable for the baseline)."""
    r = params.repair
    return RepairConfig(epochs=epochs or r.epochs, batch_size=r.batch_size, lr=r.lr,
                        momentum=r.momentum, weight_decay=r.weight_decay, stamp_rate=r.rate,
                        augment=r.augment, seed=params.base.seed)


def defence_config(params: Params) -> DefenceConfig:
    """DefenceConfig of a scan's repair: the `repair` group, MESA's fit from `recover`."""
    r = params.repair
    return DefenceConfig(method=r.method, repair=repair_config(params), mesa=mesa_config(params),
                         mesa_images=params.recover.n_images, max_residual=r.max_residual,
                         max_accuracy_drop=r.max_accuracy_drop, min_rescan_p=r.min_rescan_p,
                         rounds=r.rounds, again_p=r.again_p, recheck=r.recheck)


def attack(params: Params) -> Attack:
    """The planted attack (trigger and draws from the run's seed)."""
    p = params.poison
    config = plugins.build(attack_class(p.attack).config, p.settings[p.attack])
    return attack_from(p.attack, config, p.target, params.base.seed)


def trigger_shape(side: int, channels: int = 3) -> tuple[int, int, int]:
    """(C, h, w) of the square triggers a defender models."""
    return (channels, side, side)


def scan_settings(params: Params) -> ScanSettings:
    """ScanSettings from the `scan` group (what a calibration file is checked against)."""
    s = params.scan
    configs = {name: plugins.build(detector(name).config, block)
               for name, block in s.detectors.items()}
    return ScanSettings(detectors=configs, images=s.images, seed=params.base.seed)
